"""Adapter checkpoints (LoRA): a Megatron legacy checkpoint whose model state holds only the
adapters. Its args carry the LoRA settings (Megatron-LM / MindSpeed-LLM argument names where
they exist) and the base checkpoint it was trained on; PEFT export reads them back."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from mtrain.config.lora import LoraConfig
from mtrain.errors import CheckpointError, ConfigError


@dataclass
class AdapterCheckpointInfo:
    config: LoraConfig
    base_dir: str  # absolute path of the base checkpoint directory
    base_iteration: str  # the base's iteration ("release" or a number) when training started

    def to_args(self) -> dict:
        return {
            "lora_r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "lora_use_rslora": self.config.rslora,
            "lora_target_modules": list(self.config.target_modules),
            "lora_base_checkpoint": self.base_dir,
            "lora_base_iteration": str(self.base_iteration),
        }

    @classmethod
    def from_args(cls, args: argparse.Namespace, source: str) -> AdapterCheckpointInfo | None:
        if getattr(args, "lora_base_checkpoint", None) is None:
            return None
        try:
            config = LoraConfig(
                r=int(args.lora_r),
                alpha=float(args.lora_alpha),
                dropout=float(getattr(args, "lora_dropout", 0.0)),
                rslora=bool(getattr(args, "lora_use_rslora", False)),
                target_modules=list(args.lora_target_modules),
            ).validate()
        except (AttributeError, ConfigError) as err:
            raise CheckpointError(f"{source}: bad LoRA args ({err})") from None
        return cls(config, str(args.lora_base_checkpoint), str(args.lora_base_iteration))

    def resolve_base(self, override: str | Path | None) -> tuple[Path, str | None]:
        """The base checkpoint directory and iteration to load: the recorded one, or `override`
        (at the recorded iteration if it is the same directory, else at its latest)."""
        recorded = Path(self.base_dir)
        if override is None:
            if not recorded.is_dir():
                raise CheckpointError(
                    f"the adapters' base checkpoint {recorded} (recorded at training time) is "
                    "gone; pass its new location (base_dir= for converters, load= for training)"
                )
            return recorded, self.base_iteration
        override = Path(override)
        same = override.resolve() == recorded.resolve() if recorded.exists() else False
        return override, self.base_iteration if same else None

    def check_matches(self, cfg: LoraConfig, source: str) -> None:
        """A resumed or continued run must use the adapters' own settings."""
        saved = self.config
        for key in ("r", "alpha", "rslora"):
            if getattr(saved, key) != getattr(cfg, key):
                raise ConfigError(
                    f"lora.{key}={getattr(cfg, key)} but {source} was trained with "
                    f"lora.{key}={getattr(saved, key)}; use the same value"
                )
        if sorted(saved.target_modules) != sorted(cfg.target_modules):
            raise ConfigError(
                f"lora.target_modules={list(cfg.target_modules)} but {source} has adapters on "
                f"{saved.target_modules}; use the same modules"
            )
