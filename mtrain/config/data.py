"""The `data` config group for pretraining: which corpora, how they are tokenized and blended."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from mtrain.errors import ConfigError


@dataclass
class DataConfig:
    path: Any = MISSING  # a path or list of: .jsonl/.json/.parquet/.txt files, prepared prefixes
    weights: list[float] | None = None  # blending weight per path; default: proportional to tokens
    text_key: str = "text"  # field holding the text in JSON/JSONL/Parquet records
    cache_dir: str | None = None  # tokenized data; default $MTRAIN_CACHE or ~/.cache/mtrain/data
    workers: int = 1  # tokenization worker processes (1: in-process, the tokenizer's own threads)
    append_eod: bool = True  # end every document with the tokenizer's eos token id

    def paths(self) -> list[str]:
        """`path` as a list, whatever form the config gave it in."""
        if isinstance(self.path, (str, os.PathLike)):
            return [str(self.path)]
        return [str(p) for p in self.path]

    def cache_root(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        if os.environ.get("MTRAIN_CACHE"):
            return Path(os.environ["MTRAIN_CACHE"]).expanduser()
        return Path.home() / ".cache" / "mtrain" / "data"

    def validate(self) -> DataConfig:
        paths = self.paths()
        if not paths:
            raise ConfigError(
                "data.path is empty; give a file, a prepared prefix or a list of them"
            )
        if self.workers < 1:
            raise ConfigError(f"data.workers={self.workers} must be >= 1")
        if not self.text_key:
            raise ConfigError("data.text_key is empty; name the field that holds the text")
        check_weights(self.weights, paths)
        return self


def check_weights(weights: list[float] | None, paths: list[str]) -> None:
    """`data.weights`, when given: one non-negative weight per path, not all zero."""
    if weights is None:
        return
    weights = list(weights)
    if len(weights) != len(paths):
        raise ConfigError(
            f"data.weights gives {len(weights)} weight(s) for {len(paths)} path(s) in "
            "data.path; give one weight per path"
        )
    negative = [w for w in weights if w < 0]
    if negative:
        raise ConfigError(f"data.weights={weights} has a negative weight {negative[0]}")
    if sum(weights) <= 0:
        raise ConfigError(f"data.weights={weights} sum to zero; give a positive weight")
