"""mtrain's Ascend layer spec: megatron-core's local layers with torch_npu's fused kernels called
directly, for NPU machines without a MindSpeed that matches the installed megatron-core.

Parameter names are the local spec's, so checkpoints are the same files. Each kernel has an `npu.*`
switch; a switched-off kernel falls back to plain PyTorch in the same module (or megatron's own).

- attention: `npu_fusion_attention`. Causal batches use the compressed 2048x2048 mask with
  sparse_mode 2 (top-left causal), so no [s, s] mask is ever built. Packed batches give their
  `cu_seqlens` boundaries as `attention_mask` (int32 [b, c], see `packed_attention_mask`); the
  rows are laid end to end in the variable-length TND layout, every segment its own causal
  sequence (sparse_mode 3 with the compressed mask); a segment never sees another.
- RoPE: `npu_rotary_mul` on q and k in the attention module. The layer's SelfAttention hands the
  rotary table down instead of applying megatron's unfused RoPE.
- RMSNorm: `npu_rms_norm`; SwiGLU: `npu_swiglu` on fc1's [gate; up] output.

torch_npu is imported when a module runs, so this file imports on any machine; the CPU tests run
it against the plain-PyTorch emulation in tests/npu_emulation.
"""

from __future__ import annotations

from typing import Any

import torch

from mtrain.errors import ConfigError
from mtrain.kernels.attention import CoreAttention

COMPRESSED_MASK_SIZE = 2048  # the causal mask size npu_fusion_attention takes in sparse modes 2-4
SPARSE_TOP_LEFT_CAUSAL = 2
SPARSE_BOTTOM_RIGHT_CAUSAL = 3
_masks: dict[torch.device, torch.Tensor] = {}


def _torch_npu():
    import torch_npu

    return torch_npu


def compressed_causal_mask(device: torch.device) -> torch.Tensor:
    """True above the diagonal (True = masked out), one per device."""
    if device not in _masks:
        ones = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool)
        _masks[device] = torch.triu(ones, diagonal=1).to(device)
    return _masks[device]


def segment_ends(cu_seqlens: torch.Tensor, seq_length: int) -> list[int]:
    """Cumulative segment ends of rows laid end to end (TND's actual_seq_qlen): row r's
    boundaries [0, n1, ..., seq_length, seq_length] shifted by r * seq_length, empty
    segments dropped."""
    rows = cu_seqlens.to(torch.int64)
    offsets = torch.arange(rows.shape[0], device=rows.device)[:, None] * seq_length
    ends = (rows[:, 1:] + offsets).flatten()
    return torch.unique_consecutive(ends).tolist()


class NpuRMSNorm(torch.nn.Module):
    """RMSNorm with the local norm's parameter name (`weight`); supports sequence parallelism
    (the weight is marked so megatron all-reduces its gradient over TP)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, fused: bool = True):
        super().__init__()
        self.eps, self.fused = eps, fused
        # In the model's dtype: the NPU kernel takes gamma in the input's dtype.
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype)
        if self.fused:
            return _torch_npu().npu_rms_norm(x, weight, epsilon=self.eps)[0]
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * weight


def _mlp_class():
    from megatron.core.transformer.mlp import MLP

    class NpuSwiGLUMLP(MLP):
        """megatron's MLP with fc1 -> npu_swiglu -> fc2 (no bias: Qwen/Llama have none)."""

        def forward(self, hidden_states, per_token_scale=None):
            intermediate, bias = self.linear_fc1(hidden_states)
            assert bias is None and per_token_scale is None
            return self.linear_fc2(_torch_npu().npu_swiglu(intermediate, dim=-1))

    return NpuSwiGLUMLP


def _self_attention_class():
    from megatron.core.transformer.attention import SelfAttention

    class NpuSelfAttention(SelfAttention):
        """Hands the rotary table to the core attention, which applies it with npu_rotary_mul
        (megatron would apply its unfused RoPE here otherwise)."""

        def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
            self.core_attention.rotary_pos_emb = rotary_pos_emb
            return super().forward(hidden_states, attention_mask, *args, **kwargs)

    return NpuSelfAttention


class NpuFlashAttention(CoreAttention):
    """Core attention on npu_fusion_attention: q [s, b, n, d], k/v [s, b, g, d] -> [s, b, n*d].

    Grouped-query attention is native to the kernel (k/v keep their g heads).
    """

    def __init__(self, *args: Any, rope: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.rope = rope
        self.rotary_pos_emb = None  # set by NpuSelfAttention on every call, when rope is fused

    def _rotate(self, query: torch.Tensor, key: torch.Tensor):
        if self.rotary_pos_emb is None:
            return query, key
        mul = _torch_npu().npu_rotary_mul
        freqs = self.rotary_pos_emb  # [s, 1, 1, d] angles, or a (q, k) pair
        q_freqs, k_freqs = freqs if isinstance(freqs, tuple) else (freqs, freqs)
        out = []
        for t, freqs in ((query, q_freqs), (key, k_freqs)):
            freqs = freqs[: t.shape[0]]
            out.append(mul(t, freqs.cos().to(t.dtype), freqs.sin().to(t.dtype)))
        return out

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
        if self.rope:
            query, key = self._rotate(query, key)
        s, b, n, d = query.shape
        keep_prob = 1.0 - self.dropout_p()
        kwargs = dict(scale=self.scale, keep_prob=keep_prob)
        attend = _torch_npu().npu_fusion_attention
        mask = compressed_causal_mask(query.device)
        if attention_mask is None:  # causal rows
            hsb = [t.reshape(s, b, -1) for t in (query, key, value)]
            out = attend(
                *hsb, n, "SBH", atten_mask=mask, sparse_mode=SPARSE_TOP_LEFT_CAUSAL, **kwargs
            )
            return out[0]
        if attention_mask.dtype.is_floating_point or attention_mask.dtype == torch.bool:
            raise ValueError("the NPU attention takes cu_seqlens boundaries, not a dense mask")
        ends = segment_ends(attention_mask, s)
        tnd = [t.transpose(0, 1).reshape(b * s, t.shape[2], d) for t in (query, key, value)]
        out = attend(
            *tnd,
            n,
            "TND",
            atten_mask=mask,
            sparse_mode=SPARSE_BOTTOM_RIGHT_CAUSAL,
            actual_seq_qlen=ends,
            actual_seq_kvlen=ends,
            **kwargs,
        )[0]
        return out.reshape(b, s, n * d).transpose(0, 1).contiguous()


def check(ops: Any) -> None:
    if ops.fused_rope and not ops.flash_attn:
        raise ConfigError(
            "kernels=torch_npu: npu.fused_rope=true needs npu.flash_attn=true (the fused RoPE "
            "runs inside the flash attention module); set npu.fused_rope=false"
        )


def takes_cu_seqlens(ops: Any) -> bool:
    """The flash attention runs packed rows as variable-length sequences (the fallback, megatron's
    own attention, takes the dense block-causal mask)."""
    return bool(ops.flash_attn)


def layer_spec(qk_layernorm: bool, packed: bool, ops: Any, config: Any):
    """The block spec of this pipeline stage (`ops`: the `npu.*` switches). `packed` changes
    nothing: the flash attention takes cu_seqlens, and megatron's unfused softmax (the fallback)
    applies a given mask."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    norm = ModuleSpec(module=NpuRMSNorm, params={"fused": ops.fused_rmsnorm})
    layer = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    sub = layer.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = norm
    attn = sub.self_attention.submodules
    if qk_layernorm:
        attn.q_layernorm = attn.k_layernorm = norm
    if ops.flash_attn:
        attn.core_attention = ModuleSpec(module=NpuFlashAttention, params={"rope": ops.fused_rope})
        if ops.fused_rope:
            sub.self_attention.module = _self_attention_class()
    if ops.fused_swiglu:
        sub.mlp.module = _mlp_class()
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=norm
    )
