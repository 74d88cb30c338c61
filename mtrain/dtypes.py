"""Precision names as users write them (bf16, fp16, fp32) and as configs and Megatron store them."""

from __future__ import annotations

import torch

from mtrain.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# torch dtype -> the name HF config.json (`torch_dtype`) and Megatron args (`params_dtype`) use
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def parse_dtype(name: str | None, key: str = "dtype") -> torch.dtype | None:
    """`bf16` -> torch.bfloat16; None stays None; anything else is refused naming `key`."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"{key}={name} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]
