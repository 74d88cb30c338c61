"""Megatron's pretraining order of samples over data-parallel ranks, resumable at any global batch.

Global batch k is dataset samples [k*G, (k+1)*G) for global batch size G. It is consumed in
G / (M*D) micro-batch steps (micro-batch size M, D data-parallel ranks); in step s, rank r takes
the M samples starting at k*G + (s*D + r)*M. Every rank thus sees its share of the same global
batch whatever D is, and a run resumed after `consumed_samples` continues exactly where an
uninterrupted one would have been.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mtrain.errors import ConfigError


def micro_batches(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's collated micro-batches from `consumed_samples` on, until the last complete
    global batch of `dataset` (forever for a dataset without a length)."""
    per_step = micro_batch_size * dp_size
    if micro_batch_size < 1 or global_batch_size % per_step or global_batch_size < per_step:
        raise ConfigError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"micro_batch_size={micro_batch_size} x data-parallel size {dp_size}"
        )
    if consumed_samples % global_batch_size:
        raise ConfigError(
            f"consumed_samples={consumed_samples} is not a multiple of "
            f"global_batch_size={global_batch_size}; resume from a global-batch boundary"
        )
    if not 0 <= dp_rank < dp_size:
        raise ConfigError(f"dp_rank={dp_rank} is outside data-parallel size {dp_size}")
    total = len(dataset) if hasattr(dataset, "__len__") else None
    start = consumed_samples
    while total is None or start + global_batch_size <= total:
        for first in range(start + dp_rank * micro_batch_size, start + global_batch_size, per_step):
            yield collate([dataset[i] for i in range(first, first + micro_batch_size)])
        start += global_batch_size


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
