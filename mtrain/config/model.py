"""The `model` config group: a preset from conf/model/ or an HF directory's config.json."""

from __future__ import annotations

from dataclasses import dataclass, fields

from omegaconf import OmegaConf

from mtrain.config import CONF_DIR
from mtrain.errors import ConfigError
from mtrain.models.spec import ModelSpec, load_hf_config


@dataclass
class ModelConfig(ModelSpec):
    """A model preset: the architecture (ModelSpec's fields) plus how to get and lay it out."""

    name: str = "custom"  # preset name, for logs
    hf_dir: str | None = (
        None  # HF model directory: tokenizer, and config.json checked against the preset
    )
    recommended_tp: int = 1  # tensor-parallel size that fits this model well on 64 GB devices
    recommended_pp: int = 1  # pipeline-parallel size that goes with recommended_tp

    def tokenizer_dir(self, why: str) -> str:
        """`hf_dir`, which a stage that tokenizes needs (`why` says what for)."""
        if self.hf_dir is None:
            raise ConfigError(f"model.hf_dir is required: {why} (pass model.hf_dir=PATH)")
        return self.hf_dir

    def spec(self) -> ModelSpec:
        """The validated architecture; with `hf_dir`, its config.json must agree with the preset."""
        spec = ModelSpec(**{f.name: getattr(self, f.name) for f in fields(ModelSpec)})
        spec.validate(f"model={self.name}")
        if self.hf_dir is not None:
            hf_spec, _ = load_hf_config(self.hf_dir)
            for f in fields(ModelSpec):
                ours, theirs = getattr(spec, f.name), getattr(hf_spec, f.name)
                if ours != theirs:
                    raise ConfigError(
                        f"model.{f.name}={ours} (preset {self.name}) but {self.hf_dir}/config.json "
                        f"has {theirs}; pick the matching +model= preset"
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
