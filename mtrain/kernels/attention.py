"""The base of mtrain's core-attention modules (kernels=sdpa and kernels=torch_npu)."""

from __future__ import annotations

import math
from typing import Any

import torch


class CoreAttention(torch.nn.Module):
    """Base of mtrain's core-attention modules: the constructor megatron-core's SelfAttention
    builds its `core_attention` with, and the attention's dropout and softmax scale."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
    ):
        super().__init__()
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    @staticmethod
    def refuse_unsupported(attention_bias: Any, packed_seq_params: Any) -> None:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("mtrain's attention takes neither attention_bias nor THD")
