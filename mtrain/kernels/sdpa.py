"""Core attention on `torch.nn.functional.scaled_dot_product_attention`: the CUDA path without
Transformer Engine (torch picks its flash / memory-efficient kernels), usable on any device.

It replaces only megatron's DotProductAttention in the local spec, so names and everything else
stay the local spec's. Masks follow megatron's convention (True = masked out); SDPA's boolean
masks mean the opposite, hence the inversion.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mtrain.kernels.attention import CoreAttention

# torch >= 2.5 shares kv heads across query heads without copying them.
_NATIVE_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class SdpaAttention(CoreAttention):
    """q [s, b, n, d], k/v [s, b, g, d] -> [s, b, n*d]; causal when no mask is given."""

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        self.refuse_unsupported(attention_bias, packed_seq_params)
        s, b, n, d = query.shape
        groups = key.shape[2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        gqa = {}
        if groups != n:  # grouped-query attention: each kv head serves n / g query heads
            if _NATIVE_GQA:
                gqa = {"enable_gqa": True}
            else:
                k, v = (t.repeat_interleave(n // groups, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if attention_mask is None else ~attention_mask,
            dropout_p=self.dropout_p(),
            is_causal=attention_mask is None,
            scale=self.scale,
            **gqa,
        )
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)


def layer_spec(qk_layernorm: bool, packed: bool, ops: Any, config: Any):
    """The local layer spec with SDPA attention (`ops`, `config`: not needed here)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    layer = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    attention = layer.submodules.self_attention
    attention.submodules.core_attention = SdpaAttention
    if packed:
        attention.params["attn_mask_type"] = AttnMaskType.padding
    return layer
