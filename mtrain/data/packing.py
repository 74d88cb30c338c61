"""Samples -> fixed-length training sequences: best-fit-decreasing packing, the tensors of one
sequence, and the block-causal attention mask of a packed sequence.

A sequence of `seq_length` positions holds one or more samples back to back, then padding:

    tokens        the samples' token ids, then the pad id
    labels        next-token targets within a sample: labels[p] = tokens[p + 1] where that token
                  is trained, else -100; the last position of every sample is -100, so no sample
                  predicts the first token of the next one; -100 on padding
    loss_mask     float 1.0 where labels != -100, else 0.0
    position_ids  0, 1, ... restarting at every sample (and at the padding)
    cu_seqlens    int32 boundaries [0, n1, n1+n2, ..., total, seq_length]: the padding is a
                  segment of its own, so cu_seqlens[-1] == seq_length as varlen attention kernels
                  expect. Its length is fixed per dataset (so a batch stacks): shorter lists are
                  completed by repeating seq_length, i.e. empty segments, which varlen kernels and
                  `block_causal_mask` ignore.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of item indices, each holding at most `capacity` tokens; deterministic.

    Items go longest first (ties by index) into the bin with the least room that still fits,
    else into a new bin. Rooms are integers <= capacity, so the distinct rooms of open bins are
    kept in a sorted list (at most capacity entries) with a stack of bins per room: each item
    costs a bisection.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"item lengths must be in [1, {capacity}]")
    bins: list[list[int]] = []
    rooms: list[int] = []  # distinct rooms of open bins, ascending
    by_room: dict[int, list[int]] = {}
    for item in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[item])
        r = bisect.bisect_left(rooms, n)
        if r == len(rooms):
            b, room = len(bins), capacity
            bins.append([])
        else:
            room = rooms[r]
            b = by_room[room].pop()
            if not by_room[room]:
                del by_room[room], rooms[r]
        bins[b].append(item)
        room -= n
        if room:
            if room not in by_room:
                by_room[room] = []
                bisect.insort(rooms, room)
            by_room[room].append(b)
    return bins


def sequence(
    samples: list[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int, cu_len: int
) -> dict[str, torch.Tensor]:
    """The tensors of one sequence (module docstring) from (token ids, trained mask) samples."""
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, -100, dtype=np.int64)
    positions = np.empty(seq_length, dtype=np.int64)
    steps = np.arange(seq_length, dtype=np.int64)
    total = sum(len(ids) for ids, _ in samples)
    if total > seq_length or len(samples) + 2 > cu_len + (total == seq_length):
        raise ValueError(f"{len(samples)} samples of {total} tokens do not fit one sequence")
    cu, p = [0], 0
    for ids, trained in samples:
        n = len(ids)
        tokens[p : p + n] = ids
        labels[p : p + n - 1] = np.where(trained[1:] != 0, tokens[p + 1 : p + n], -100)
        positions[p : p + n] = steps[:n]
        p += n
        cu.append(p)
    positions[p:] = steps[: seq_length - p]
    cu += [seq_length] * (cu_len - len(cu))
    labels_t = torch.from_numpy(labels)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": labels_t,
        "loss_mask": (labels_t != -100).float(),
        "position_ids": torch.from_numpy(positions),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
    }


def block_causal_mask(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Megatron's attention mask (True = masked out) confining attention to each segment of
    `cu_seqlens`, causal within it: [1, s, s] for one sequence, [b, 1, s, s] for a batch."""
    cu = cu_seqlens.to(torch.int64)
    pos = torch.arange(seq_length, device=cu.device)
    if cu.dim() == 1:
        segment = torch.searchsorted(cu[1:].contiguous(), pos, right=True)
        allowed = (segment[:, None] == segment[None, :]) & (pos[None, :] <= pos[:, None])
        return ~allowed.unsqueeze(0)
    segment = torch.searchsorted(
        cu[:, 1:].contiguous(), pos.expand(len(cu), -1).contiguous(), right=True
    )
    same = segment[:, :, None] == segment[:, None, :]
    allowed = same & (pos[None, :] <= pos[:, None])
    return ~allowed.unsqueeze(1)
