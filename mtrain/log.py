"""Rank-aware logging: rank 0 speaks by default, every rank can be enabled for debugging."""

from __future__ import annotations

import logging
import os
import sys


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def __init__(self, all_ranks: bool):
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        return self.all_ranks or rank() == 0 or record.levelno >= logging.WARNING


def setup(level: str = "INFO", all_ranks: bool = False) -> None:
    """Configure the `mtrain` and `converters` loggers once: one line per message, on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank{rank()}] " if all_ranks else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    handler.addFilter(_RankFilter(all_ranks))
    for name in ("mtrain", "converters"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
