"""`ModelSpec`: the one description of a decoder-only model that every part of mtrain reads.

It is built from an HF `config.json`, from a `conf/model/` preset, or from the `args` stored in a
Megatron checkpoint (see mtrain.checkpoint.args), and turned back into each of those.
Family-specific facts (which HF `model_type`, q/k norms, qkv bias) come from the mapping tables in
`mtrain/models/families`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mtrain.errors import CheckpointError, ConfigError
from mtrain.models import moe_spec
from mtrain.models.families import FAMILIES, Family, family_for_model_type
from mtrain.models.moe_spec import MOE_FIELDS


@dataclass
class ModelSpec:
    """Architecture hyper-parameters, in Megatron's vocabulary."""

    family: str  # a key of mtrain.models.families.FAMILIES: qwen3 | qwen2 | llama
    num_layers: int  # decoder layers
    hidden_size: int  # model width
    ffn_hidden_size: int  # MLP width (HF intermediate_size)
    num_attention_heads: int  # query heads
    num_query_groups: int  # HF num_key_value_heads
    kv_channels: int  # head dim; HF head_dim, which for Qwen3 is not hidden_size / heads
    vocab_size: int  # HF vocab_size (rows of the HF embedding), before any TP padding
    max_position_embeddings: int  # longest sequence the model is made for
    rope_theta: float  # RoPE base
    norm_epsilon: float  # RMSNorm epsilon (HF rms_norm_eps)
    tie_word_embeddings: bool  # output layer shares the embedding matrix
    rope_scaling_factor: float | None = None  # Llama 3.1-style ("llama3") RoPE scaling
    # Mixture of experts (family qwen3_moe); None for dense models.
    num_experts: int | None = None  # routed experts per MoE layer (HF num_experts)
    moe_router_topk: int | None = None  # experts each token goes to (HF num_experts_per_tok)
    moe_ffn_hidden_size: int | None = None  # one expert's MLP width (HF moe_intermediate_size)
    moe_norm_topk_prob: bool | None = None  # renormalise the top-k router probabilities
    moe_dense_layers: tuple[int, ...] | None = None  # layers with a dense MLP (HF mlp_only_layers)

    def __post_init__(self):
        if self.moe_dense_layers is not None:  # from YAML or JSON it comes as a list
            self.moe_dense_layers = tuple(self.moe_dense_layers)
        if self.num_experts is not None:  # what an MoE model without these keys means
            self.moe_norm_topk_prob = (
                True if self.moe_norm_topk_prob is None else bool(self.moe_norm_topk_prob)
            )
            self.moe_dense_layers = self.moe_dense_layers or ()

    @property
    def family_table(self) -> Family:
        return FAMILIES[self.family]

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` (global, from 0) has routed experts."""
        return self.is_moe and layer not in (self.moe_dense_layers or ())

    def moe_layer_pattern(self) -> list[int]:
        """1 for an MoE layer, 0 for a dense one: megatron-core's `moe_layer_freq` as a list
        (its integer form counts from layer 0, HF's decoder_sparse_step from layer 1)."""
        return [int(self.is_moe_layer(i)) for i in range(self.num_layers)]

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def validate(self, source: str) -> ModelSpec:
        """Check internal consistency; `source` names where the values came from."""
        if self.family not in FAMILIES:
            raise ConfigError(
                f"{source}: family={self.family!r} is not supported; use one of {sorted(FAMILIES)}"
            )
        for name in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "kv_channels",
            "vocab_size",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{source}: {name}={getattr(self, name)} must be positive")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"{source}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        self._validate_moe(source)
        return self

    def _validate_moe(self, source: str) -> None:
        moe_spec.validate(self, source)

    def check_experts(self, ep: int, etp: int, source: str = "") -> None:
        """Refuse an expert-parallel layout this model cannot be split into."""
        moe_spec.check_experts(self, ep, etp, source)

    def check_parallel(self, tp: int, pp: int, vpp: int = 1, source: str = "") -> None:
        """Refuse a TP/PP layout this model cannot be split into, naming a layout that works."""
        source = f"{source}: " if source else ""
        if tp < 1 or pp < 1:
            raise ConfigError(f"{source}tp={tp} and pp={pp} must be >= 1")
        if self.num_query_groups % tp or self.num_attention_heads % tp:
            ok = [
                t
                for t in range(1, self.num_query_groups + 1)
                if self.num_query_groups % t == 0 and self.num_attention_heads % t == 0
            ]
            raise ConfigError(
                f"{source}tp={tp} must divide num_query_groups={self.num_query_groups} and "
                f"num_attention_heads={self.num_attention_heads}; try tp in {ok}"
            )
        if self.ffn_hidden_size % tp:
            raise ConfigError(f"{source}tp={tp} must divide ffn_hidden_size={self.ffn_hidden_size}")
        if self.num_layers % (pp * vpp):
            ok = [p for p in range(1, self.num_layers + 1) if self.num_layers % (p * vpp) == 0]
            what = f"pp={pp}" if vpp == 1 else f"pp*vpp={pp}*{vpp}"
            hint = f"try pp in {ok}" if ok else f"vpp={vpp} must divide num_layers"
            raise ConfigError(f"{source}{what} must divide num_layers={self.num_layers}; {hint}")

    def padded_vocab_size(self, tp: int) -> int:
        """Vocab rows in Megatron: the HF size when TP divides it, else the next multiple of TP.

        Megatron's own `make_vocab_size_divisible_by` padding would make the size depend on
        more than TP and break resharding, so mtrain pads only as much as TP needs.
        """
        return -(-self.vocab_size // tp) * tp

    def shape_symbols(self) -> dict[str, int]:
        """Values of the symbols the family tables write tensor shapes in."""
        d = self.kv_channels
        symbols = {
            "hidden": self.hidden_size,
            "ffn": self.ffn_hidden_size,
            "vocab": self.vocab_size,
            "q": self.num_attention_heads * d,
            "kv": self.num_query_groups * d,
            "head": d,
            "labels": 1,
        }
        if self.is_moe:
            symbols.update(experts=self.num_experts, moe_ffn=self.moe_ffn_hidden_size)
        return symbols

    def layer_parameters(self, layer: int = 0) -> int:
        """Parameters of decoder layer `layer`, from the family table."""
        moe = self.is_moe_layer(layer)
        return self.family_table.layer_parameters(self.shape_symbols(), moe)

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count of the HF model (embedding counted once when tied); with `active`,
        those one token goes through (MoE: the router's top-k experts of each layer)."""
        family, symbols = self.family_table, self.shape_symbols()
        heads = [family.embedding, family.final_norm]
        if not self.tie_word_embeddings:
            heads.append(family.output)
        experts = self.moe_router_topk if active else None
        layers = sum(
            family.layer_parameters(symbols, self.is_moe_layer(i), experts)
            for i in range(self.num_layers)
        )
        return layers + sum(e.numel(symbols) for e in heads)


OPTIONAL_FIELDS = ("rope_scaling_factor", *MOE_FIELDS)  # not needed for a dense preset


# --- HF config.json --------------------------------------------------------------------------


def _rope(cfg: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the scaling dict, from either transformers 4 or 5 style config.json."""
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters={params!r} must be a JSON object")
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling={scaling!r} must be a JSON object or null")
    if params is not None:
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") != "default" else None
    else:
        theta = cfg.get("rope_theta", 10000.0)
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"{source}: rope_theta={theta!r} must be a positive number")
    return float(theta), scaling or None


# Megatron implements exactly this RoPE scaling (Llama 3.1's), with only `factor` configurable.
_LLAMA3_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


class _Fields:
    """Typed reads of config.json fields; a wrong type or value is one error naming the field."""

    def __init__(self, cfg: dict[str, Any], source: str):
        self.cfg, self.source = cfg, source

    def fail(self, key: str, want: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}={self.cfg.get(key)!r} must be {want}")

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.cfg.get(key)
        value = default if value is None else value
        if value is None:
            raise ConfigError(f"{self.source}: required field {key!r} is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(key, "a positive integer")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.cfg.get(key)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self.fail(key, "a positive number")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.cfg.get(key)
        value = default if value is None else value
        if not isinstance(value, bool):
            raise self.fail(key, "true or false")
        return value


def spec_from_hf_config(cfg: dict[str, Any], source: str = "config.json") -> ModelSpec:
    """Read an HF config dict; refuse any option mtrain would silently get wrong."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: must hold a JSON object, not a {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    family = family_for_model_type(model_type if isinstance(model_type, str) else "")
    if family is None:
        supported = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
        raise ConfigError(
            f"{source}: model_type={model_type!r} is not supported; supported: {supported}"
        )
    read = _Fields(cfg, source)

    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
    if cfg.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true is not supported")
    if bool(cfg.get("attention_bias", family.qkv_bias)) != family.qkv_bias:
        raise ConfigError(
            f"{source}: attention_bias={cfg.get('attention_bias')} is not "
            f"supported for model_type={model_type!r}"
        )
    if cfg.get("use_sliding_window"):
        raise ConfigError(
            f"{source}: use_sliding_window=true is not supported; "
            "set it to false (full attention) to train with mtrain"
        )

    theta, scaling = _rope(cfg, source)
    factor = None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        try:
            fixed_ok = all(float(scaling.get(k, v)) == v for k, v in _LLAMA3_FIXED.items())
            factor = float(scaling["factor"]) if kind == "llama3" else None
        except (KeyError, TypeError, ValueError):
            fixed_ok = False
        if kind != "llama3" or not fixed_ok or factor is None or factor <= 0:
            raise ConfigError(
                f"{source}: rope scaling {scaling} is not supported (only "
                f"'llama3' with a positive factor and {_LLAMA3_FIXED})"
            )

    heads = read.integer("num_attention_heads")
    hidden = read.integer("hidden_size")
    if cfg.get("head_dim") is None and hidden % heads:
        raise ConfigError(
            f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
            "and head_dim is not given"
        )
    layers = read.integer("num_hidden_layers")
    return ModelSpec(
        family=family.name,
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=read.integer("intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=read.integer("num_key_value_heads", heads),
        kv_channels=read.integer("head_dim", hidden // heads),
        vocab_size=read.integer("vocab_size"),
        max_position_embeddings=read.integer("max_position_embeddings", 4096),
        rope_theta=theta,
        norm_epsilon=read.number("rms_norm_eps", 1e-6),
        tie_word_embeddings=read.boolean("tie_word_embeddings", False),
        rope_scaling_factor=factor,
        **(moe_spec.from_hf(read, layers) if family.expert else {}),
    ).validate(source)


def load_hf_config(hf_dir: str | Path) -> tuple[ModelSpec, dict[str, Any]]:
    """The spec and the raw dict of `<hf_dir>/config.json`."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found; hf_dir must be a Hugging Face model directory")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    return spec_from_hf_config(raw, str(path)), raw


def hf_config_from_spec(spec: ModelSpec, dtype: str = "bfloat16") -> dict[str, Any]:
    """A config.json dict for `spec`, written by the installed transformers' own config class."""
    from transformers import CONFIG_MAPPING

    family = spec.family_table
    kwargs: dict[str, Any] = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_query_groups,
        head_dim=spec.kv_channels,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        rms_norm_eps=spec.norm_epsilon,
        tie_word_embeddings=spec.tie_word_embeddings,
        hidden_act="silu",
    )
    if spec.rope_scaling_factor is not None:
        kwargs["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": spec.rope_scaling_factor,
            **_LLAMA3_FIXED,
        }
    kwargs.update(moe_spec.hf_kwargs(spec))
    config = CONFIG_MAPPING[family.hf_model_types[0]](**kwargs)
    config.architectures = [family.hf_architecture]
    out = config.to_dict()
    out["torch_dtype" if "torch_dtype" in out else "dtype"] = dtype
    return out


def spec_from_mapping(values: dict[str, Any], source: str) -> ModelSpec:
    """Build a spec from a preset or config mapping that has (at least) the spec's fields."""
    names = [f.name for f in fields(ModelSpec)]
    missing = [n for n in names if n not in values and n not in OPTIONAL_FIELDS]
    if missing:
        raise ConfigError(f"{source}: missing model keys {missing}")
    return ModelSpec(**{n: values[n] for n in names if n in values}).validate(source)


def spec_dict(spec: ModelSpec) -> dict[str, Any]:
    return asdict(spec)
