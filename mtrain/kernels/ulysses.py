"""Ulysses context parallelism around any core attention (kernels=local, sdpa, torch_npu).

Under `parallel.cp=C` each CP rank holds two chunks of every sequence (see
mtrain/context_parallel.py): chunk r and chunk 2C-1-r of 2C equal chunks. Around the core
attention, an all-to-all over the CP group trades the sequence split for a head split: each rank
then holds the whole sequence for 1/C of this TP rank's heads. The gathered sequence arrives in
rank order (chunks 0, 2C-1, 1, 2C-2, ...); it is put back in true token order before the wrapped
attention runs, so that attention sees an ordinary full sequence: its own causal mask, a packed
row's block-causal mask or cu_seqlens, all as without CP. The output is put back in rank order
and a second all-to-all returns the sequence split.

Query heads are grouped by their kv head in megatron's layout, so the i-th block of n/C query
heads uses exactly the i-th block of g/C kv heads when g (per TP rank) is a multiple of C. When
C is a multiple of g instead, each kv head is repeated C/g times first (exact: the copies are
equal, and their gradients add up in the repeat's backward), so each rank gets the one kv head
its query heads use.
RoPE has been applied by megatron before core attention, on each rank's own chunks with their
true positions; with the torch_npu fused RoPE (applied inside its core attention) the wrapper
applies it on the local chunks before the exchange.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from mtrain.context_parallel import chunk_order


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x [C, ...] -> [C, ...]: block j goes to rank j; block i of the result came from rank i."""
    x = x.contiguous()  # (empty_like would copy a permuted view's strides)
    out = torch.empty_like(x)
    torch.distributed.all_to_all_single(out, x, group=group)
    return out


class _SeqToHeads(torch.autograd.Function):
    """[s/C, b, h, d] (sequence split) -> [s, b, h/C, d] (head split), sequence in rank order."""

    @staticmethod
    def forward(ctx, x, group, cp):
        ctx.group, ctx.cp = group, cp
        return _seq_to_heads(x, group, cp)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group, ctx.cp), None, None


class _HeadsToSeq(torch.autograd.Function):
    """The inverse of `_SeqToHeads`."""

    @staticmethod
    def forward(ctx, x, group, cp):
        ctx.group, ctx.cp = group, cp
        return _heads_to_seq(x, group, cp)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group, ctx.cp), None, None


def _seq_to_heads(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    s, b, h, d = x.shape
    blocks = x.reshape(s, b, cp, h // cp, d).permute(2, 0, 1, 3, 4)  # [C, s/C, b, h/C, d]
    return _all_to_all(blocks, group).reshape(cp * s, b, h // cp, d)


def _heads_to_seq(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    s, b, h, d = x.shape
    blocks = _all_to_all(x.reshape(cp, s // cp, b, h, d), group)  # [C (head block), s/C, ...]
    return blocks.permute(1, 2, 0, 3, 4).reshape(s // cp, b, cp * h, d)


def _orders(seq: int, cp: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(true position of each gathered row, gathered row of each true position)."""
    chunk = seq // (2 * cp)
    blocks = torch.tensor(chunk_order(cp), device=device)
    gathered = (blocks[:, None] * chunk + torch.arange(chunk, device=device)).flatten()
    return gathered, torch.argsort(gathered)


class UlyssesAttention(torch.nn.Module):
    """Wraps the core attention built from `inner` (a module or ModuleSpec); q [s/C, b, n, d],
    k/v [s/C, b, g, d] -> [s/C, b, n*d], where n and g are this TP rank's heads."""

    def __init__(self, config: Any, *args: Any, inner: Any = None, **kwargs: Any):
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.transformer.spec_utils import build_module

        self.cp = cp = config.context_parallel_size
        self.group = parallel_state.get_context_parallel_group()
        tp = config.tensor_model_parallel_size
        self.kv_repeat = max(1, cp * tp // config.num_query_groups)  # kv heads per TP rank < C
        # The wrapped attention sees 1/C of the heads and no context parallelism.
        inner_config = copy.copy(config)
        inner_config.context_parallel_size = 1
        inner_config.num_attention_heads = config.num_attention_heads // cp
        inner_config.num_query_groups = config.num_query_groups * self.kv_repeat // cp
        self.inner = build_module(inner, inner_config, *args, **kwargs)

    @property
    def rotary_pos_emb(self):
        return getattr(self.inner, "rotary_pos_emb", None)

    @rotary_pos_emb.setter
    def rotary_pos_emb(self, value) -> None:  # set by torch_npu's fused-RoPE self-attention
        self._rotary = value

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        rotary = getattr(self, "_rotary", None)
        if rotary is not None:  # torch_npu's fused RoPE: on the local chunks, true positions
            self.inner.rotary_pos_emb = rotary
            query, key = self.inner._rotate(query, key)
            self.inner.rotary_pos_emb = None
        if self.kv_repeat > 1:
            key, value = (t.repeat_interleave(self.kv_repeat, dim=2) for t in (key, value))
        gathered, true_order = _orders(query.shape[0] * self.cp, self.cp, query.device)
        q, k, v = (
            _SeqToHeads.apply(t, self.group, self.cp)[true_order] for t in (query, key, value)
        )
        out = self.inner(q, k, v, attention_mask, *args, **kwargs)  # [s, b, n/C * d]
        s, b, _ = out.shape
        out = out[gathered].reshape(s, b, -1, query.shape[-1])
        return _HeadsToSeq.apply(out, self.group, self.cp).reshape(s // self.cp, b, -1)


def wrap_layer_spec(spec: Any) -> Any:
    """The layer (or block) spec with each layer's core attention wrapped in UlyssesAttention."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    layers = getattr(spec, "layer_specs", None) or [spec]
    done = set()
    for layer in layers:
        attention = layer.submodules.self_attention.submodules
        if id(attention) in done:  # the same spec object serves every layer
            continue
        done.add(id(attention))
        attention.core_attention = ModuleSpec(
            module=UlyssesAttention, params={"inner": attention.core_attention}
        )
    return spec
