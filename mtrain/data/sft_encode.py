"""Batches of conversations -> the arrays of an SFT cache entry, in this process or in workers.

A batch of records (each one or more conversations, `size` of them: 2 for a DPO pair) becomes a
`Piece`: its samples' token ids and trained-token masks back to back, each sample's length and
first trained position, and the conversations refused on the way (a token across a turn
boundary), which the caller counts in order. A record with a refused conversation is left out
whole. A piece depends on its batch alone, so pieces written in batch order give the same bytes
however many processes made them (`data.workers`).

With one worker the next batch is read and rendered (Python) in a thread while the tokenizer
(Rust, with its own threads, no GIL) works on this one. With N > 1, N spawned processes each render and
tokenize whole batches on one tokenizer thread. They receive the encoder itself: the
`tokenizers` backend, the template and the end-of-turn ids (masking.py and templates.py say what
travels), so they load no tokenizer and import neither transformers' models nor torch for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mtrain.data import pool
from mtrain.data.masking import ChatEncoder, Encoded, Rendered
from mtrain.errors import DataError

BATCH = 4096  # records per batch in one process (the tokenizer's threads share a batch)
WORKER_BATCH = 1024  # records per batch shipped to a worker: several per worker balance the tail

Refused = tuple[str, DataError]  # (record location, why)


class Batch(NamedTuple):
    conversations: list[list[dict]]
    where: list[str]  # per conversation, its record's location
    records: int  # good records
    # records that could not be read since the previous batch: (good records before, where, why)
    errors: list[tuple[int, str, DataError]]


@dataclass
class Piece:
    ids: np.ndarray  # every sample's token ids, back to back, in the entry's dtype
    mask: np.ndarray  # uint8 per token, 1 where trained
    lengths: np.ndarray  # int64 per sample
    firsts: np.ndarray  # int32 per sample: the first trained position a label can reach
    refused: list[Refused]

    @property
    def trained(self) -> int:
        return int(self.mask.sum(dtype=np.int64))


def encode_piece(
    encoder: ChatEncoder,
    rendered: Rendered,
    where: list[str],
    size: int,
    dtype: np.dtype,
    source: str,
) -> Piece:
    refused: list[Refused] = []
    encoded = encoder.tokenize(rendered, where, lambda w, err: refused.append((w, err)))
    if refused:  # a record goes whole: all its `size` conversations, or none
        groups = [encoded[i : i + size] for i in range(0, len(encoded), size)]
        encoded = [e for group in groups if all(e is not None for e in group) for e in group]
    ids, mask = _flatten(encoded, dtype, source)
    lengths = np.fromiter((len(e.ids) for e in encoded), np.int64, len(encoded))
    firsts = np.fromiter((_first_trained(e) for e in encoded), np.int32, len(encoded))
    return Piece(ids, mask, lengths, firsts, refused)


class Encoding:
    """Turns batches into pieces, in batch order; the worker pool starts on first use."""

    def __init__(self, encoder: ChatEncoder, dtype: np.dtype, workers: int = 1):
        self.encoder, self.dtype, self.workers = encoder, dtype, workers
        self._pool: ProcessPoolExecutor | None = None

    @property
    def batch_size(self) -> int:
        return BATCH if self.workers == 1 else WORKER_BATCH

    def close(self) -> None:
        pool.stop(self._pool)
        self._pool = None

    def pieces(
        self, batches: Iterable[Batch], size: int, source: Path
    ) -> Iterator[tuple[Batch, Piece]]:
        if self.workers == 1:
            return self._threaded(batches, size, str(source))
        if self._pool is None:
            self._pool = pool.start(self.workers, _worker_init, (self.encoder, self.dtype))
        tasks = ((batch, size, str(source)) for batch in batches)
        work = pool.in_order(self._pool, _worker_piece, tasks, 2 * self.workers)
        return ((batch, piece) for (batch, _, _), piece in work)

    def _threaded(
        self, batches: Iterable[Batch], size: int, source: str
    ) -> Iterator[tuple[Batch, Piece]]:
        batches = iter(batches)

        def ahead() -> tuple[Batch | None, Rendered | None]:  # the next batch, read and rendered
            batch = next(batches, None)
            return batch, None if batch is None else self.encoder.render(batch.conversations)

        with ThreadPoolExecutor(1) as helper:
            following = helper.submit(ahead)
            while True:
                batch, rendered = following.result()
                if batch is None:
                    return
                following = helper.submit(ahead)
                yield (
                    batch,
                    encode_piece(self.encoder, rendered, batch.where, size, self.dtype, source),
                )


# Pool workers keep their encoder here (set once by the initializer, never in the main process).
_WORKER: dict = {}


def _worker_init(encoder: ChatEncoder, dtype: np.dtype) -> None:
    pool.single_threaded()
    _WORKER.update(encoder=encoder, dtype=dtype)


def _worker_piece(task: tuple[Batch, int, str]) -> Piece:
    batch, size, source = task
    encoder = _WORKER["encoder"]
    rendered = encoder.render(batch.conversations)
    return encode_piece(encoder, rendered, batch.where, size, _WORKER["dtype"], source)


def _flatten(encoded: list[Encoded], dtype: np.dtype, source: str) -> tuple[np.ndarray, np.ndarray]:
    """All samples' token ids back to back in `dtype`, and their trained-token mask."""
    sizes = [len(e.ids) for e in encoded]
    ids = np.fromiter(chain.from_iterable(e.ids for e in encoded), dtype=np.int64, count=sum(sizes))
    if len(ids) and ids.max() > np.iinfo(dtype).max:
        raise DataError(f"{source}: token id {ids.max()} does not fit the dataset's {dtype}")
    mask = np.zeros(len(ids), dtype=np.uint8)
    offset = 0
    for size, e in zip(sizes, encoded):
        for a, b in e.spans:
            mask[offset + a : offset + b] = 1
        offset += size
    return ids.astype(dtype), mask


def _first_trained(e: Encoded) -> int:
    """The first trained position a label can reach (>= 1), or len(ids) when there is none."""
    for a, b in e.spans:
        if max(a, 1) < b:
            return max(a, 1)
    return len(e.ids)
