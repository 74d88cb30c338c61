"""The `lora` config group: low-rank adapters on the decoder's linear layers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mtrain.errors import ConfigError
from mtrain.models.families import LORA_TARGETS, hf_lora_names

# Every supported family has the same four linears (mtrain/models/families/base.py).
TARGETS = LORA_TARGETS
_HF_NAMES = hf_lora_names()


@dataclass
class LoraConfig:
    r: int = 8  # adapter rank
    alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the adapter's input while training
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    target_modules: list[str] = field(
        default_factory=lambda: list(TARGETS)
    )  # which of linear_qkv, linear_proj, linear_fc1, linear_fc2 get adapters

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def validate(self) -> LoraConfig:
        if self.r <= 0:
            raise ConfigError(f"lora.r={self.r} must be a positive integer")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha={self.alpha} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")
        targets = list(self.target_modules)
        if not targets:
            raise ConfigError(f"lora.target_modules is empty; choose from {list(TARGETS)}")
        for name in targets:
            if name in TARGETS:
                continue
            if name in _HF_NAMES:
                raise ConfigError(
                    f"lora.target_modules: {name!r} is an HF name; megatron fuses it into "
                    f"{_HF_NAMES[name]!r}, name that instead"
                )
            raise ConfigError(f"lora.target_modules: {name!r} is not one of {list(TARGETS)}")
        if len(set(targets)) != len(targets):
            raise ConfigError(f"lora.target_modules={targets} names a module twice")
        return self
