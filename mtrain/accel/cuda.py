"""CUDA backend: NCCL, one GPU per process (LOCAL_RANK)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

NAME = "cuda"
DIST_BACKEND = "nccl"


def install_shim(before_megatron: Callable[[], None] | None = None) -> None:
    """Nothing to patch on CUDA; only megatron's expected runtime setting."""
    # Megatron's TP communication overlap needs kernels queued in issue order.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if before_megatron is not None:
        before_megatron()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def device_count() -> int:
    return torch.cuda.device_count()


def describe() -> dict[str, str]:
    info = {"cuda": str(torch.version.cuda), "gpus": str(torch.cuda.device_count())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
