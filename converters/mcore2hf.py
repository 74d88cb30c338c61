"""Megatron legacy checkpoint -> HF safetensors, one layer at a time.

    python -m converters.mcore2hf ckpt_dir=CKPT out_dir=HF_OUT [hf_dir=HF] [dtype=bf16] [force=true]

LoRA adapter checkpoints: `lora.merge=true` (default) writes the base with the adapters merged;
`lora.merge=false` writes a PEFT adapter for the original HF model. The work is done by
mtrain/checkpoint/hf_export.py (which training's `checkpoint.save_hf` uses too); its docstring
says how memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from mtrain.checkpoint.hf_export import export_hf
from mtrain.checkpoint.hf_io import DEFAULT_MAX_SHARD_BYTES
from mtrain.cli import hydra_command
from mtrain.dtypes import parse_dtype
from mtrain.errors import ConfigError


@dataclass
class LoraExportConfig:
    merge: bool = True  # true: merged HF weights; false: a PEFT adapter (needs no base weights)


@dataclass
class McoreToHFConfig:
    ckpt_dir: str = (
        MISSING  # Megatron checkpoint directory (holds latest_checkpointed_iteration.txt)
    )
    out_dir: str = MISSING  # where the HF model goes; must be empty unless force
    hf_dir: str | None = (
        None  # original HF model: config, tokenizer and generation files are copied
    )
    iteration: str | None = (
        None  # which checkpoint: an iteration number or "release"; default latest
    )
    dtype: str | None = None  # bf16 | fp16 | fp32; default keeps the checkpoint's dtypes
    max_shard_size_gb: float = DEFAULT_MAX_SHARD_BYTES / 1000**3  # HF shard size limit
    force: bool = False  # replace a non-empty out_dir (only once the new one is complete)
    base_dir: str | None = None  # LoRA: the base checkpoint, if not the one the adapters recorded
    lora: LoraExportConfig = field(default_factory=LoraExportConfig)


def convert(cfg: McoreToHFConfig) -> Path:
    if cfg.max_shard_size_gb <= 0:
        raise ConfigError(f"max_shard_size_gb={cfg.max_shard_size_gb} must be positive")
    return export_hf(
        cfg.ckpt_dir,
        cfg.out_dir,
        iteration=cfg.iteration,
        hf_dir=cfg.hf_dir,
        dtype=parse_dtype(cfg.dtype),
        max_shard_bytes=int(cfg.max_shard_size_gb * 1000**3),
        force=cfg.force,
        base_dir=cfg.base_dir,
        merge_lora=cfg.lora.merge,
    )


@hydra_command("mcore2hf", McoreToHFConfig)
def main(cfg: McoreToHFConfig) -> None:
    convert(cfg)


if __name__ == "__main__":
    main()
