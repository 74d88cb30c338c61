"""The `model` config group: the architecture, read from `model.hf_dir/config.json`, or given by
a `conf/model/` preset (`+model=<name>`), or both (then they must agree).

`model.hf_dir=DIR` alone is enough for every command: config.json holds every architecture key
of a supported family. A preset is a shortcut for a model without a directory at hand (a dry run
of Qwen3-32B) and carries a recommended layout; with `hf_dir` it is checked against config.json,
every differing key listed at once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mtrain.config import CONF_DIR
from mtrain.errors import ConfigError
from mtrain.models.spec import OPTIONAL_FIELDS, ModelSpec, load_hf_config

SPEC_FIELDS = tuple(f.name for f in fields(ModelSpec))


@dataclass
class ModelConfig:
    """The model of a run. The architecture keys mirror ModelSpec's; null means "from
    config.json" (or, without hf_dir, "not given")."""

    name: str | None = None  # for logs and the dry run; default: the preset's or hf_dir's name
    hf_dir: str | None = None  # HF model directory: config.json (the architecture) and tokenizer
    family: str | None = None  # a key of mtrain.models.families.FAMILIES: qwen3 | qwen2 | llama
    num_layers: int | None = None  # decoder layers
    hidden_size: int | None = None  # model width
    ffn_hidden_size: int | None = None  # MLP width (HF intermediate_size)
    num_attention_heads: int | None = None  # query heads
    num_query_groups: int | None = None  # HF num_key_value_heads
    kv_channels: int | None = None  # head dim; HF head_dim, which for Qwen3 is not hidden / heads
    vocab_size: int | None = None  # HF vocab_size (rows of the HF embedding), before TP padding
    max_position_embeddings: int | None = None  # longest sequence the model is made for
    rope_theta: float | None = None  # RoPE base
    norm_epsilon: float | None = None  # RMSNorm epsilon (HF rms_norm_eps)
    tie_word_embeddings: bool | None = None  # output layer shares the embedding matrix
    rope_scaling_factor: float | None = None  # Llama 3.1-style ("llama3") RoPE scaling
    num_experts: int | None = None  # MoE: routed experts per MoE layer (HF num_experts)
    moe_router_topk: int | None = None  # MoE: experts each token goes to (HF num_experts_per_tok)
    moe_ffn_hidden_size: int | None = None  # MoE: one expert's MLP width (HF moe_intermediate_size)
    moe_norm_topk_prob: bool | None = None  # MoE: renormalise the top-k probabilities; default true
    moe_dense_layers: list[int] | None = None  # MoE: layers with a dense MLP (HF mlp_only_layers)
    recommended_tp: int = 1  # tensor-parallel size used when parallel.tp is not given
    recommended_pp: int = 1  # pipeline-parallel size used when parallel.pp is not given
    recommended_ep: int = 1  # expert-parallel size used when parallel.ep is not given (MoE)

    @property
    def display_name(self) -> str:
        """What logs and the dry run call the model."""
        if self.name:
            return self.name
        return Path(self.hf_dir).resolve().name if self.hf_dir else "custom"

    def given(self) -> dict[str, Any]:
        """The architecture keys this config sets (a preset's, or overrides)."""
        return {k: getattr(self, k) for k in SPEC_FIELDS if getattr(self, k) is not None}

    def tokenizer_dir(self, why: str) -> str:
        """`hf_dir`, which a stage that tokenizes needs (`why` says what for)."""
        if self.hf_dir is None:
            raise ConfigError(f"model.hf_dir is required: {why} (pass model.hf_dir=PATH)")
        return self.hf_dir

    def spec(self) -> ModelSpec:
        """The validated architecture: config.json's, which the keys given here must match; or,
        without hf_dir, the keys given here (a preset)."""
        given = self.given()
        source = f"model={self.display_name}"
        if self.hf_dir is None:
            missing = [k for k in SPEC_FIELDS if k not in given and k not in OPTIONAL_FIELDS]
            if len(missing) == len(SPEC_FIELDS) - len(OPTIONAL_FIELDS):
                presets = "|".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
                raise ConfigError(
                    "no model given: pass model.hf_dir=HF_DIR (its config.json describes the "
                    f"model) or a preset, +model=<{presets}>"
                )
            if missing:
                raise ConfigError(
                    f"{source}: model.{', model.'.join(missing)} not given; pass "
                    "model.hf_dir=HF_DIR to read the architecture from its config.json"
                )
            return ModelSpec(**given).validate(source)
        spec, _ = load_hf_config(self.hf_dir)
        given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
        differ = [k for k, v in given.items() if getattr(spec, k) != v]
        if differ:
            origin = f"preset {self.name}" if self.name else "given"
            config = f"{self.hf_dir}/config.json"
            listed = ", ".join(
                f"model.{k}={given[k]} ({origin}) but {config} has {getattr(spec, k)}"
                for k in differ
            )
            raise ConfigError(
                f"{listed}; leave out +model= (config.json has the architecture) or give the "
                "matching values"
            )
        return spec


PRESET_DIR = CONF_DIR / "model"


def load_preset(name: str) -> ModelConfig:
    """The conf/model/<name>.yaml preset over the schema."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"model preset {name!r} not found in {PRESET_DIR}; known: {known}")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)
