"""`npu_fusion_attention` as explicit softmax attention (semantics: the package docstring)."""

from __future__ import annotations

from functools import lru_cache
from itertools import pairwise

import torch

COMPRESSED = 2048  # side of the compressed causal mask that sparse_modes 2-4 take
STATS_WIDTH = 8  # softmax_max / softmax_sum repeat each row's value over a last dim of 8


@lru_cache(maxsize=1)
def _compressed_mask() -> torch.Tensor:
    return torch.triu(torch.ones(COMPRESSED, COMPRESSED, dtype=torch.bool), diagonal=1)


def _to_bnsd(x: torch.Tensor, layout: str, head_dim: int) -> torch.Tensor:
    if layout == "BSH":
        return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)
    if layout == "SBH":
        return x.unflatten(-1, (-1, head_dim)).permute(1, 2, 0, 3)
    return x.transpose(1, 2) if layout == "BSND" else x


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BSH":
        return x.transpose(1, 2).flatten(2)
    if layout == "SBH":
        return x.permute(2, 0, 1, 3).flatten(2)
    return x.transpose(1, 2) if layout == "BSND" else x


def _hidden(
    mode: int, mask: torch.Tensor | None, sq: int, skv: int, pre: int, nxt: int
) -> torch.Tensor | None:
    """Which (query i, key j) pairs one sequence hides (True = hidden), or None for none."""
    i = torch.arange(sq)[:, None]
    j = torch.arange(skv)[None, :]
    if mode in (0, 1) and mask is not None and mask.shape[-2:] != (sq, skv):
        raise ValueError(
            f"atten_mask shape {tuple(mask.shape)} does not end in (Sq, Skv)=({sq}, {skv})"
        )
    if mode == 0:  # the band is aligned top-left and applies only together with a mask
        return None if mask is None else mask | (j < i - pre) | (j > i + nxt)
    if mode == 1:
        if mask is None:
            raise ValueError("sparse_mode=1 (allMask) needs the full atten_mask")
        return mask
    shift = skv - sq  # modes 3 and 4 align the diagonal with the bottom-right corner
    if mode == 2:
        return j > i
    if mode == 3:
        return j > i + shift
    return (j > i + shift + nxt) | (j < i + shift - pre)


def _attend(q, k, v, hidden, scale: float, keep_prob: float):
    """q [B,N,Sq,D], k/v [B,N_kv,Skv,D] -> out [B,N,Sq,D], row max and row sum [B,N,Sq]."""
    group = q.shape[1] // k.shape[1]  # GQA: query head i reads kv head i // group
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = scale * (q @ k.transpose(-1, -2))
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)  # -inf where a whole row is hidden
    exp = torch.exp(scores - torch.where(row_max.isneginf(), 0.0, row_max).detach())
    row_sum = exp.sum(dim=-1, keepdim=True)
    probs = exp / torch.where(row_sum > 0, row_sum, 1.0)  # a hidden row stays zeros, not NaN
    if keep_prob < 1.0:
        probs = probs * (torch.rand_like(probs) < keep_prob) / keep_prob
    return probs @ v, row_max.squeeze(-1).detach(), row_sum.squeeze(-1).detach()


def _ends(offsets, total: int, name: str) -> list[int]:
    ends = [int(e) for e in (offsets.tolist() if torch.is_tensor(offsets) else offsets)]
    if not ends or ends[-1] != total or any(b < a for a, b in pairwise([0, *ends])):
        raise ValueError(
            f"{name}={ends} must be cumulative end offsets ending at T={total} "
            "(e.g. [3, 7, 12] for lengths 3, 4, 5; no leading 0)"
        )
    return ends


def _packed_sequences(q, k, mask, mode, pre, nxt, qlen, kvlen):
    """TND: ((q0, q1), (k0, k1), hidden) of each packed sequence, after the checks both the op
    and its gradient make."""
    if qlen is None or kvlen is None:
        raise ValueError("input_layout='TND' needs actual_seq_qlen and actual_seq_kvlen")
    q_ends, kv_ends = (
        _ends(qlen, q.shape[0], "actual_seq_qlen"),
        _ends(kvlen, k.shape[0], "actual_seq_kvlen"),
    )
    if len(q_ends) != len(kv_ends):
        raise ValueError(
            f"actual_seq_qlen has {len(q_ends)} sequences, actual_seq_kvlen {len(kv_ends)}"
        )
    if mode in (0, 1) and mask is not None and mask.dim() != 2:
        raise ValueError(f"with TND, atten_mask must be [maxSq, maxSkv], got {tuple(mask.shape)}")
    for (q0, q1), (k0, k1) in zip(pairwise([0, *q_ends]), pairwise([0, *kv_ends])):
        seq_mask = mask[: q1 - q0, : k1 - k0] if mode in (0, 1) and mask is not None else None
        yield (q0, q1), (k0, k1), _hidden(mode, seq_mask, q1 - q0, k1 - k0, pre, nxt)


def _attend_packed(q, k, v, mask, mode, scale, keep_prob, pre, nxt, qlen, kvlen):
    """TND: each packed sequence attends only to itself; q [T,N,D] -> out [T,N,D], stats [T,N]."""
    outs, maxes, sums = [], [], []
    for (q0, q1), (k0, k1), hidden in _packed_sequences(q, k, mask, mode, pre, nxt, qlen, kvlen):
        qi, ki, vi = (
            t[a:b].transpose(0, 1)[None] for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1))
        )
        out, row_max, row_sum = _attend(qi, ki, vi, hidden, scale, keep_prob)
        outs.append(out[0].transpose(0, 1))
        maxes.append(row_max[0].transpose(0, 1))
        sums.append(row_sum[0].transpose(0, 1))
    return torch.cat(outs), torch.cat(maxes), torch.cat(sums)


def _check_arguments(pse, padding_mask, prefix, atten_mask, keep_prob, sparse_mode, layout) -> None:
    for name, given in (("pse", pse), ("padding_mask", padding_mask), ("prefix", prefix)):
        if given is not None:
            raise NotImplementedError(f"npu_fusion_attention emulation: {name} is not supported")
    if sparse_mode in (5, 6, 7, 8):
        raise NotImplementedError(
            f"npu_fusion_attention emulation: sparse_mode={sparse_mode} is not supported"
        )
    if sparse_mode not in (0, 1, 2, 3, 4):
        raise ValueError(f"sparse_mode={sparse_mode} is not one of 0-8")
    if layout not in ("BSH", "SBH", "BSND", "BNSD", "TND"):
        raise ValueError(f"input_layout={layout!r} is not one of BSH, SBH, BSND, BNSD, TND")
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob={keep_prob} must be in (0, 1]")
    if atten_mask is not None and atten_mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(
            f"atten_mask must be bool or uint8 (True / 1 = masked out), got {atten_mask.dtype}"
        )
    if sparse_mode in (2, 3, 4) and (
        atten_mask is None or not torch.equal(atten_mask.bool().cpu(), _compressed_mask())
    ):
        shape = None if atten_mask is None else tuple(atten_mask.shape)
        raise ValueError(
            f"sparse_mode={sparse_mode} needs the compressed mask torch.triu(torch.ones({COMPRESSED}, "
            f"{COMPRESSED}, dtype=torch.bool), diagonal=1) as atten_mask, got shape {shape}"
        )


def npu_fusion_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    head_num: int,
    input_layout: str,
    pse: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None,
    scale: float = 1.0,
    keep_prob: float = 1.0,
    pre_tockens: int = 2147483647,
    next_tockens: int = 2147483647,
    inner_precise: int = 0,
    prefix: list[int] | None = None,
    actual_seq_qlen: list[int] | torch.Tensor | None = None,
    actual_seq_kvlen: list[int] | torch.Tensor | None = None,
    sparse_mode: int = 0,
    gen_mask_parallel: bool = True,
    sync: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    """inner_precise, gen_mask_parallel and sync only tune the real kernel; they are ignored."""
    _check_arguments(pse, padding_mask, prefix, atten_mask, keep_prob, sparse_mode, input_layout)
    mask = None if atten_mask is None else atten_mask.bool()
    q, k, v = query.float(), key.float(), value.float()
    if input_layout == "TND":
        heads, kv_heads = q.shape[1], k.shape[1]
    else:
        if actual_seq_qlen is not None or actual_seq_kvlen is not None:
            raise ValueError(f"actual_seq_qlen / actual_seq_kvlen are for TND, not {input_layout}")
        if input_layout in ("BSH", "SBH") and q.shape[-1] % head_num:
            raise ValueError(
                f"query hidden size {q.shape[-1]} is not a multiple of head_num={head_num}"
            )
        head_dim = q.shape[-1] // head_num
        q, k, v = (_to_bnsd(t, input_layout, head_dim) for t in (q, k, v))
        heads, kv_heads = q.shape[1], k.shape[1]
    if heads != head_num or heads % kv_heads:
        raise ValueError(
            f"query has {heads} heads and key {kv_heads}; need head_num={head_num}, a multiple of it"
        )
    if input_layout == "TND":
        args = (mask, sparse_mode, scale, keep_prob, pre_tockens, next_tockens)
        out, row_max, row_sum = _attend_packed(q, k, v, *args, actual_seq_qlen, actual_seq_kvlen)
    else:
        hidden = _hidden(sparse_mode, mask, q.shape[2], k.shape[2], pre_tockens, next_tockens)
        out, row_max, row_sum = _attend(q, k, v, hidden, scale, keep_prob)
        out = _from_bnsd(out, input_layout)

    def stats(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(-1).expand(*t.shape, STATS_WIDTH).contiguous()

    return out.to(query.dtype), stats(row_max), stats(row_sum), query.new_empty(0), 0, 0, 0


def _attend_grad(q, k, v, dy, out, hidden, scale, row_max, row_sum):
    """The flash-attention backward of one [B,N,S,D] block: probabilities rebuilt from the row
    max / sum of the WHOLE attention (as a ring of blocks saves them), dS = P * (dP - D) with
    D = rowsum(dy * out), so a block's gradients add up to the full attention's."""
    group = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = scale * (q @ ke.transpose(-1, -2))
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    if row_max is None:  # a lone block: its own statistics
        row_max = scores.amax(dim=-1)
        finite = torch.where(row_max.isneginf(), 0.0, row_max)
        row_sum = torch.exp(scores - finite[..., None]).sum(dim=-1)
    finite = torch.where(row_max.isneginf(), 0.0, row_max)
    probs = (
        torch.exp(scores - finite[..., None]) / torch.where(row_sum > 0, row_sum, 1.0)[..., None]
    )
    if out is None:
        out = probs @ ve
    d_probs = dy @ ve.transpose(-1, -2)
    d_scores = probs * (d_probs - (dy * out).sum(dim=-1, keepdim=True))
    dq = scale * d_scores @ ke
    dk = (scale * d_scores.transpose(-1, -2) @ q).unflatten(1, (-1, group)).sum(dim=2)
    dv = (probs.transpose(-1, -2) @ dy).unflatten(1, (-1, group)).sum(dim=2)
    return dq, dk, dv


def npu_fusion_attention_grad(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dy: torch.Tensor,
    head_num: int,
    input_layout: str,
    *,
    pse: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None,
    softmax_max: torch.Tensor | None = None,
    softmax_sum: torch.Tensor | None = None,
    softmax_in: torch.Tensor | None = None,
    attention_in: torch.Tensor | None = None,
    scale_value: float = 1.0,
    keep_prob: float = 1.0,
    pre_tockens: int = 2147483647,
    next_tockens: int = 2147483647,
    inner_precise: int = 0,
    seed: int = 0,
    offset: int = 0,
    numels: int = 0,
    prefix: list[int] | None = None,
    actual_seq_qlen: list[int] | torch.Tensor | None = None,
    actual_seq_kvlen: list[int] | torch.Tensor | None = None,
    sparse_mode: int = 0,
    gen_mask_parallel: bool = True,
    sync: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dpse) of `npu_fusion_attention` with the same arguments. softmax_max /
    softmax_sum / attention_in, when given, are the statistics and output of the whole attention
    this block belongs to (ring attention), else the block's own. keep_prob must be 1: the real
    kernel replays its dropout mask from seed / offset, which the emulation does not keep."""
    _check_arguments(pse, padding_mask, prefix, atten_mask, keep_prob, sparse_mode, input_layout)
    if keep_prob != 1.0:
        raise NotImplementedError("npu_fusion_attention_grad emulation: keep_prob < 1")
    mask = None if atten_mask is None else atten_mask.bool()
    q, k, v, g = query.float(), key.float(), value.float(), dy.float()
    out = None if attention_in is None else attention_in.float()
    stat_max = None if softmax_max is None else softmax_max[..., 0].float()
    stat_sum = None if softmax_sum is None else softmax_sum[..., 0].float()
    if input_layout == "TND":
        grads = [torch.zeros_like(t) for t in (q, k, v)]
        sequences = _packed_sequences(
            q, k, mask, sparse_mode, pre_tockens, next_tockens, actual_seq_qlen, actual_seq_kvlen
        )
        for (q0, q1), (k0, k1), hidden in sequences:

            def one(t, a, b):  # [T,N,...] -> sequence a:b as [1,N,S,...]
                return None if t is None else t[a:b].transpose(0, 1)[None]

            pieces = _attend_grad(
                one(q, q0, q1), one(k, k0, k1), one(v, k0, k1), one(g, q0, q1),
                one(out, q0, q1), hidden, scale_value, one(stat_max, q0, q1),
                one(stat_sum, q0, q1),
            )  # fmt: skip
            for grad, piece, (a, b) in zip(grads, pieces, ((q0, q1), (k0, k1), (k0, k1))):
                grad[a:b] = piece[0].transpose(0, 1)
        dq, dk, dv = grads
    else:
        head_dim = q.shape[-1] // head_num if input_layout in ("BSH", "SBH") else q.shape[-1]
        q, k, v, g = (_to_bnsd(t, input_layout, head_dim) for t in (q, k, v, g))
        out = None if out is None else _to_bnsd(out, input_layout, head_dim)
        hidden = _hidden(sparse_mode, mask, q.shape[2], k.shape[2], pre_tockens, next_tockens)
        dq, dk, dv = (
            _from_bnsd(t, input_layout)
            for t in _attend_grad(q, k, v, g, out, hidden, scale_value, stat_max, stat_sum)
        )
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), query.new_empty(0)
