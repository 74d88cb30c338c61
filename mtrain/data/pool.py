"""Tokenization worker processes (`data.workers`), shared by the PT and the SFT caches.

The pool uses the spawn context: safe under torch.distributed and threads, where fork is not. A
worker imports what its function and initializer arguments need (the caches ship the
`tokenizers` backend, not transformers), plus, as spawn always does, the main module's own
imports. Results come back in input order, from a bounded window of items in flight, so the
caller writes its output exactly as one process would, with memory that stays flat.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def start(workers: int, initializer: Callable, initargs: tuple) -> multiprocessing.pool.Pool:
    return multiprocessing.get_context("spawn").Pool(workers, initializer, initargs)


def stop(pool: multiprocessing.pool.Pool | None) -> None:
    if pool is not None:
        pool.terminate()  # workers hold nothing worth finishing once the caller is done
        pool.join()


def single_threaded() -> None:
    """In a worker: one tokenizer thread each, since the pool itself is the parallelism."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def in_order(
    pool: multiprocessing.pool.Pool, fn: Callable[[Any], Any], items: Iterable, window: int
) -> Iterator[tuple[Any, Any]]:
    """(item, fn(item)) for every item, in item order, at most `window` items in flight."""
    pending: deque = deque()
    for item in items:
        pending.append((item, pool.apply_async(fn, (item,))))
        if len(pending) >= window:
            item, result = pending.popleft()
            yield item, result.get()
    while pending:
        item, result = pending.popleft()
        yield item, result.get()
