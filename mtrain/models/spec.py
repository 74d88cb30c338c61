"""`ModelSpec`: the one description of a decoder-only model that every part of mtrain reads.

It is built from an HF `config.json`, from a `conf/model/` preset, or from the `args` stored in a
Megatron checkpoint, and turned back into each of those. Family-specific facts (which HF
`model_type`, q/k norms, qkv bias) come from the mapping tables in `converters/mappings`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from converters.mappings import FAMILIES, Family, family_for_model_type
from mtrain.errors import CheckpointError, ConfigError


@dataclass
class ModelSpec:
    """Architecture hyper-parameters, in Megatron's vocabulary."""

    family: str  # a key of converters.mappings.FAMILIES: qwen3 | qwen2 | llama
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

    @property
    def family_table(self) -> Family:
        return FAMILIES[self.family]

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
        return self

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

    def num_parameters(self) -> int:
        """Parameter count of the HF model (embedding counted once when tied)."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.kv_channels
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attn = h * (q + 2 * kv) + q * h
        if self.family_table.qkv_bias:
            attn += q + 2 * kv
        if self.family_table.qk_layernorm:
            attn += 2 * d
        per_layer = attn + 3 * h * f + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h


# --- HF config.json --------------------------------------------------------------------------


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the scaling dict, from either transformers 4 or 5 style config.json."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") != "default" else None
        return float(theta), scaling
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(cfg.get("rope_theta", 10000.0)), scaling


# Megatron implements exactly this RoPE scaling (Llama 3.1's), with only `factor` configurable.
_LLAMA3_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def spec_from_hf_config(cfg: dict[str, Any], source: str = "config.json") -> ModelSpec:
    """Read an HF config dict; refuse any option mtrain would silently get wrong."""
    model_type = cfg.get("model_type")
    family = family_for_model_type(model_type or "")
    if family is None:
        supported = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
        raise ConfigError(
            f"{source}: model_type={model_type!r} is not supported; supported: {supported}"
        )

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise ConfigError(f"{source}: required field {key!r} is missing")
        return cfg[key]

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

    theta, scaling = _rope(cfg)
    factor = None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        fixed_ok = all(float(scaling.get(k, v)) == v for k, v in _LLAMA3_FIXED.items())
        if kind != "llama3" or not fixed_ok:
            raise ConfigError(
                f"{source}: rope scaling {scaling} is not supported (only "
                f"'llama3' with {_LLAMA3_FIXED})"
            )
        factor = float(scaling["factor"])

    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    return ModelSpec(
        family=family.name,
        num_layers=int(need("num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(need("intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        kv_channels=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=int(need("vocab_size")),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope_theta=theta,
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_scaling_factor=factor,
    ).validate(source)


def load_hf_config(hf_dir: str | Path) -> tuple[ModelSpec, dict[str, Any]]:
    """The spec and the raw dict of `<hf_dir>/config.json`."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found; hf_dir must be a Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
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
    config = CONFIG_MAPPING[family.hf_model_types[0]](**kwargs)
    config.architectures = [family.hf_architecture]
    out = config.to_dict()
    out["torch_dtype" if "torch_dtype" in out else "dtype"] = dtype
    return out


# --- Megatron checkpoint args ----------------------------------------------------------------


def megatron_args(spec: ModelSpec, tp: int, pp: int, params_dtype: str) -> argparse.Namespace:
    """The `args` namespace stored in every rank file, with Megatron-LM's argument names.

    MindSpeed-LLM and Megatron-LM read the parallel sizes and the model shape back from these.
    """
    family = spec.family_table
    return argparse.Namespace(
        model_type_hf=spec.family,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None,
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        group_query_attention=spec.num_query_groups != spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels,
        vocab_size=spec.vocab_size,
        padded_vocab_size=spec.padded_vocab_size(tp),
        max_position_embeddings=spec.max_position_embeddings,
        seq_length=spec.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope_theta,
        use_rope_scaling=spec.rope_scaling_factor is not None,
        rope_scaling_factor=spec.rope_scaling_factor or 8.0,
        normalization="RMSNorm",
        norm_epsilon=spec.norm_epsilon,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=family.qkv_bias,
        qk_layernorm=family.qk_layernorm,
        untie_embeddings_and_output_weights=not spec.tie_word_embeddings,
        transformer_impl="local",
        params_dtype=params_dtype,
        bf16=params_dtype == "bfloat16",
        fp16=params_dtype == "float16",
    )


def spec_from_megatron_args(args: argparse.Namespace, source: str) -> ModelSpec:
    """Inverse of `megatron_args`; also reads checkpoints written by MindSpeed-LLM/Megatron-LM."""
    a = vars(args)

    def need(key: str) -> Any:
        if a.get(key) is None:
            raise CheckpointError(f"{source}: checkpoint args lack {key!r}")
        return a[key]

    family = a.get("model_type_hf")
    if family not in FAMILIES:  # a foreign checkpoint: infer the family from its switches
        family = "qwen3" if a.get("qk_layernorm") else "qwen2" if a.get("add_qkv_bias") else "llama"
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    groups = a.get("num_query_groups") if a.get("group_query_attention", True) else None
    return ModelSpec(
        family=family,
        num_layers=int(need("num_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(need("ffn_hidden_size")),
        num_attention_heads=heads,
        num_query_groups=int(groups or heads),
        kv_channels=int(a.get("kv_channels") or hidden // heads),
        vocab_size=int(a.get("vocab_size") or need("padded_vocab_size")),
        max_position_embeddings=int(a.get("max_position_embeddings") or 4096),
        rope_theta=float(a.get("rotary_base") or 10000.0),
        norm_epsilon=float(a.get("norm_epsilon") or 1e-6),
        tie_word_embeddings=not a.get("untie_embeddings_and_output_weights", True),
        rope_scaling_factor=a.get("rope_scaling_factor") if a.get("use_rope_scaling") else None,
    ).validate(source)


def spec_from_mapping(values: dict[str, Any], source: str) -> ModelSpec:
    """Build a spec from a preset or config mapping that has (at least) the spec's fields."""
    names = [f.name for f in fields(ModelSpec)]
    missing = [n for n in names if n not in values and n != "rope_scaling_factor"]
    if missing:
        raise ConfigError(f"{source}: missing model keys {missing}")
    return ModelSpec(**{n: values[n] for n in names if n in values}).validate(source)


def spec_dict(spec: ModelSpec) -> dict[str, Any]:
    return asdict(spec)
