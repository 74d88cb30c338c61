"""The Megatron legacy checkpoint layout (`--ckpt-format torch`), shared by converters and trainer.

    <dir>/latest_checkpointed_iteration.txt      "release" or an iteration number
    <dir>/release/ or <dir>/iter_0000100/
        mp_rank_{tp:02d}/model_optim_rng.pt          when PP == 1
        mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt when PP > 1

Each file is a `torch.save`d dict with `args` (argparse.Namespace, Megatron-LM argument names),
`checkpoint_version`, `iteration` and `model` (the rank's state dict), plus optimizer, scheduler
and RNG state when written by training. MindSpeed-LLM and Megatron-LM read and write this layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from mtrain.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
RELEASE = "release"


def iteration_dir_name(iteration: int | str) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def rank_file(iter_dir: Path, tp_rank: int, pp_rank: int, pp_size: int) -> Path:
    return iter_dir / rank_dir_name(tp_rank, pp_rank, pp_size) / RANK_FILE


def read_tracker(ckpt_dir: Path) -> int | str:
    """The iteration named by the tracker file: an int, or "release"."""
    tracker = ckpt_dir / TRACKER
    if not tracker.is_file():
        raise CheckpointError(
            f"{tracker} not found; ckpt_dir must be a Megatron checkpoint directory "
            "(written by mtrain, hf2mcore, MindSpeed-LLM or Megatron-LM)"
        )
    text = tracker.read_text().strip()
    if text == RELEASE:
        return RELEASE
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(
            f"{tracker}: expected 'release' or an integer, got {text!r}"
        ) from None


def write_tracker(ckpt_dir: Path, iteration: int | str) -> None:
    (ckpt_dir / TRACKER).write_text(f"{iteration}\n")


def load_rank_file(path: Path, mmap: bool = True) -> dict[str, Any]:
    """Load one rank file without unpickling arbitrary objects (only tensors, containers and
    `argparse.Namespace`); with `mmap` tensors are paged in only when touched."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found; the checkpoint is incomplete")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot be read as a Megatron rank file ({err})") from None


def save_rank_file(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
