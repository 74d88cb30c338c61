"""Tensor-parallel layouts: how each tensor kind is cut into TP shards and put back together.

Each kind's layout is written once, as the `pieces` of a TP shard: which rows and columns of
which HF tensor fill which rows of the shard. hf2mcore builds each rank's tensors from slice reads
of exactly those bytes (`shard`); a run starting from HF weights reads them straight into its
parameters (`shard_into`); neither ever loads a whole tensor. mcore2hf does the inverse from the
TP shards of one tensor (`merge`).

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

import functools
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


class SliceReaderInto(Protocol):
    """Reads (part of) a named HF tensor into `out`, which has the slice's shape (and any dtype
    or device: values are cast as `out.copy_` casts them)."""

    def read_into(
        self, name: str, out: torch.Tensor, rows: slice | None = None, cols: slice | None = None
    ) -> None: ...


@dataclass(frozen=True)
class Piece:
    """Rows `at`.. of a shard are the `rows` x `cols` of the entry's HF tensor number `source`."""

    source: int
    rows: slice
    cols: slice | None
    at: int


def _part(total: int, tp: int, rank: int) -> slice:
    size = total // tp
    return slice(rank * size, (rank + 1) * size)


def pieces(entry: Entry, rank: int, dims: Dims) -> list[Piece]:
    """Where each row block of the TP-rank `rank` shard of `entry` comes from, in row order.
    Rows after the last piece are vocabulary padding: zero."""
    kind, tp = entry.kind, dims.tp
    shapes = dims.hf_shapes(entry)
    if kind is Kind.REPLICATED:
        return [Piece(0, slice(0, shapes[0][0]), None, 0)]
    if kind is Kind.COLUMN:
        return [Piece(0, _part(shapes[0][0], tp, rank), None, 0)]
    if kind is Kind.ROW:
        return [Piece(0, slice(0, shapes[0][0]), _part(shapes[0][1], tp, rank), 0)]
    if kind is Kind.GATED_FC1:
        gate, up = (_part(s[0], tp, rank) for s in shapes)
        return [Piece(0, gate, None, 0), Piece(1, up, None, gate.stop - gate.start)]
    if kind is Kind.QKV:
        d, h = dims.head_dim, dims.heads_per_group
        groups = _part(dims.groups, tp, rank)
        out = []
        for local, g in enumerate(range(groups.start, groups.stop)):
            at = local * (h + 2) * d
            out += [
                Piece(0, slice(g * h * d, (g + 1) * h * d), None, at),
                Piece(1, slice(g * d, (g + 1) * d), None, at + h * d),
                Piece(2, slice(g * d, (g + 1) * d), None, at + (h + 1) * d),
            ]
        return out
    if kind is Kind.VOCAB:
        rows = _part(dims.padded_vocab, tp, rank)
        return [Piece(0, slice(rows.start, max(rows.start, min(rows.stop, dims.vocab))), None, 0)]
    raise AssertionError(kind)


def shard(
    entry: Entry, hf_names: list[str], read: SliceReader, rank: int, dims: Dims
) -> torch.Tensor:
    """The TP-rank `rank` shard of the Megatron tensor `entry`, read from its HF tensors. Parts
    of different dtypes give the dtype that holds each of them exactly (a bf16 q with an fp32 k
    gives an fp32 qkv)."""
    parts = [(p, read(hf_names[p.source], p.rows, p.cols)) for p in pieces(entry, rank, dims)]
    dtype = functools.reduce(torch.promote_types, [t.dtype for _, t in parts])
    rows = shard_shape(entry, dims)[0]
    whole = parts[0][1]
    if (
        len(parts) == 1 and parts[0][0].at == 0 and len(whole) == rows
        and whole.untyped_storage().nbytes() == whole.numel() * whole.element_size()
    ):  # fmt: skip
        return whole  # one piece that is the whole shard and owns its memory: no copy
    out = torch.empty(rows, *parts[0][1].shape[1:], dtype=dtype)  # any trailing shape (LoRA's B)
    end = 0
    for p, t in parts:  # the pieces fill the rows in order (see `pieces`)
        out[p.at : p.at + len(t)] = t
        end = p.at + len(t)
    out[end:].zero_()  # the padded vocabulary rows
    return out


def shard_into(
    entry: Entry,
    hf_names: list[str],
    reader: SliceReaderInto,
    rank: int,
    dims: Dims,
    out: torch.Tensor,
) -> None:
    """Write the TP-rank `rank` shard of `entry` into `out` (of `shard_shape`), each piece read
    straight into its rows: no intermediate tensor where `out` has the HF dtype."""
    end = 0
    for p in pieces(entry, rank, dims):
        end = p.at + p.rows.stop - p.rows.start
        reader.read_into(hf_names[p.source], out[p.at : end], p.rows, p.cols)
    if end < len(out):
        out[end:].zero_()


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
