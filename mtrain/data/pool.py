"""Tokenization worker processes (`data.workers`), shared by the PT and the SFT caches.

The pool uses the spawn context: safe under torch.distributed and threads, where fork is not. A
worker imports what its function and initializer arguments need (the caches ship the
`tokenizers` backend, not transformers), plus, as spawn always does, the main module's own
imports. Results come back in input order, from a bounded window of items in flight, so the
caller writes its output exactly as one process would, with memory that stays flat. A worker
that fails to start or dies is an error, never a wait without end.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from mtrain.errors import ConfigError


def start(workers: int, initializer: Callable, initargs: tuple) -> ProcessPoolExecutor:
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, context, initializer, initargs)


def stop(pool: ProcessPoolExecutor | None) -> None:
    if pool is not None:
        pool.shutdown(cancel_futures=True)  # work not started is dropped, a running item ends


def single_threaded() -> None:
    """In a worker: one tokenizer thread each, since the pool itself is the parallelism."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def in_order(
    pool: ProcessPoolExecutor, fn: Callable[[Any], Any], items: Iterable, window: int
) -> Iterator[tuple[Any, Any]]:
    """(item, fn(item)) for every item, in item order, at most `window` items in flight."""
    pending: deque = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= window:
                item, future = pending.popleft()
                yield item, future.result()
        while pending:
            item, future = pending.popleft()
            yield item, future.result()
    except BrokenProcessPool as err:
        raise ConfigError(
            "data.workers: a tokenization worker process stopped or could not start (its error "
            "is above; out of memory?). A script that starts one must run under "
            "`if __name__ == '__main__':`, since every worker re-imports it; or set data.workers=1"
        ) from err
