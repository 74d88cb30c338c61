"""Tensor-parallel layouts: how each tensor kind is cut into TP shards and put back together.

hf2mcore asks, per TP rank, for exactly the rows/columns that rank needs (`shard`), so a rank file
is built from slice reads of the HF files without ever loading a whole tensor. mcore2hf does the
inverse from the TP shards of one tensor (`merge`).

GQA interleave (Kind.QKV). Megatron stores q, k and v fused and grouped by kv group g:
    [q heads of g (h*d rows) | k of g (d rows) | v of g (d rows)] for g in 0..G-1
i.e. `cat([q.view(G, h*d, ...), k.view(G, d, ...), v.view(G, d, ...)], 1).reshape(-1, ...)`,
with h = heads per group and d = head dim. TP rank t holds groups [t*G/TP, (t+1)*G/TP), which is
`chunk(TP, dim=0)[t]` of the fused tensor. A plain `cat([q, k, v])` is wrong for every GQA model.

Gated MLP (Kind.GATED_FC1). Rank t holds `cat([gate.chunk(TP)[t], up.chunk(TP)[t]])`; Megatron
computes `silu(first half) * second half` on each rank.

Vocabulary (Kind.VOCAB). Rows are padded with zeros to `padded_vocab` (a multiple of TP) and
split along dim 0; the padding is trimmed on the way back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from mtrain.models.families.base import Entry, Kind
from mtrain.models.spec import ModelSpec


@dataclass(frozen=True)
class Dims:
    """The sizes the layouts need, for one model at one TP degree."""

    tp: int
    groups: int  # kv groups G
    heads_per_group: int  # h
    head_dim: int  # d
    vocab: int
    padded_vocab: int
    symbols: dict[str, int]  # values of the shape symbols used in the mapping tables

    @classmethod
    def of(cls, spec: ModelSpec, tp: int) -> Dims:
        d = spec.kv_channels
        return cls(
            tp=tp,
            groups=spec.num_query_groups,
            heads_per_group=spec.heads_per_group,
            head_dim=d,
            vocab=spec.vocab_size,
            padded_vocab=spec.padded_vocab_size(tp),
            symbols=spec.shape_symbols(),
        )

    def hf_shapes(self, entry: Entry) -> list[tuple[int, ...]]:
        return [tuple(self.symbols[s] for s in shape) for shape in entry.shapes]


class SliceReader(Protocol):
    """Reads (part of) a named HF tensor: `rows` slices dim 0, `cols` slices dim 1."""

    def __call__(
        self, name: str, rows: slice | None = None, cols: slice | None = None
    ) -> torch.Tensor: ...


def _part(total: int, tp: int, rank: int) -> slice:
    size = total // tp
    return slice(rank * size, (rank + 1) * size)


def shard(
    entry: Entry, hf_names: list[str], read: SliceReader, rank: int, dims: Dims
) -> torch.Tensor:
    """The TP-rank `rank` shard of the Megatron tensor `entry`, read from its HF tensors."""
    kind, tp = entry.kind, dims.tp
    shapes = dims.hf_shapes(entry)
    if kind is Kind.REPLICATED:
        return read(hf_names[0])
    if kind is Kind.COLUMN:
        return read(hf_names[0], rows=_part(shapes[0][0], tp, rank))
    if kind is Kind.ROW:
        return read(hf_names[0], cols=_part(shapes[0][1], tp, rank))
    if kind is Kind.GATED_FC1:
        gate, up = (read(n, rows=_part(s[0], tp, rank)) for n, s in zip(hf_names, shapes))
        return _cat_same_dtype([gate, up])
    if kind is Kind.QKV:
        local = dims.groups // tp
        g = _part(dims.groups, tp, rank)
        d, h = dims.head_dim, dims.heads_per_group
        q = read(hf_names[0], rows=slice(g.start * h * d, g.stop * h * d))
        k = read(hf_names[1], rows=slice(g.start * d, g.stop * d))
        v = read(hf_names[2], rows=slice(g.start * d, g.stop * d))
        rest = q.shape[1:]
        fused = _cat_same_dtype(
            [
                q.reshape(local, h * d, *rest),
                k.reshape(local, d, *rest),
                v.reshape(local, d, *rest),
            ],
            dim=1,
        )
        return fused.reshape(-1, *rest)
    if kind is Kind.VOCAB:
        rows = _part(dims.padded_vocab, tp, rank)
        real = read(hf_names[0], rows=slice(rows.start, min(rows.stop, dims.vocab)))
        missing = rows.stop - rows.start - real.shape[0]
        if missing:
            pad = torch.zeros(missing, *real.shape[1:], dtype=real.dtype)
            real = torch.cat([real, pad])
        return real
    raise AssertionError(kind)


def merge(entry: Entry, shards: list[torch.Tensor], dims: Dims) -> list[torch.Tensor]:
    """The HF tensors of `entry` (in table order) from its TP shards (in rank order)."""
    kind = entry.kind
    if kind is Kind.REPLICATED:
        return [shards[0].clone()]
    if kind is Kind.COLUMN:
        return [torch.cat(shards, dim=0)]
    if kind is Kind.ROW:
        return [torch.cat(shards, dim=1)]
    if kind is Kind.GATED_FC1:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])]
    if kind is Kind.QKV:
        d, h = dims.head_dim, dims.heads_per_group
        parts: list[list[torch.Tensor]] = [[], [], []]
        for s in shards:
            rest = s.shape[1:]
            grouped = s.reshape(-1, (h + 2) * d, *rest)
            q, k, v = grouped.split([h * d, d, d], dim=1)
            for out, t in zip(parts, (q, k, v)):
                out.append(t.reshape(-1, *rest))
        return [torch.cat(p) for p in parts]
    if kind is Kind.VOCAB:
        return [torch.cat(shards)[: dims.vocab].clone()]
    raise AssertionError(kind)


def shard_shape(entry: Entry, dims: Dims) -> tuple[int, ...]:
    """The shape every TP shard of `entry` has (all kinds split evenly)."""
    shapes = dims.hf_shapes(entry)
    kind, tp = entry.kind, dims.tp
    first = shapes[0]
    if kind is Kind.REPLICATED:
        return first
    if kind is Kind.ROW:
        return (first[0], first[1] // tp)
    if kind is Kind.VOCAB:
        return (dims.padded_vocab // tp, *first[1:])
    rows = sum(s[0] for s in shapes) // tp  # COLUMN, GATED_FC1, QKV
    return (rows, *first[1:])


def _cat_same_dtype(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """cat of the parts of one fused tensor; parts of different dtypes go to the widest one,
    which is lossless (e.g. a bf16 q with an fp32 k gives an fp32 qkv)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        widest = max(dtypes, key=lambda dt: torch.finfo(dt).bits)
        tensors = [t.to(widest) for t in tensors]
    return torch.cat(tensors, dim=dim)
