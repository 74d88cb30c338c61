"""The `data` config group for SFT: conversation files, chat template, loss mask, packing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

from omegaconf import MISSING

from mtrain.config.data import check_weights
from mtrain.errors import ConfigError

FORMATS = ("auto", "alpaca", "sharegpt", "openai")
TEMPLATES = ("auto", "tokenizer", "qwen3", "qwen2_5", "llama3")
THINKING = ("on", "off", "keep")
TRAIN_ON = ("assistant", "last", "all")
TRUNCATION = ("right", "drop")
# The names `data.columns` may rename, per record format (see mtrain/data/formats.py).
COLUMN_NAMES = (
    "instruction", "input", "output", "system", "history", "messages", "role", "content",
    "tools",
)  # fmt: skip


@dataclass
class SFTDataConfig:
    path: Any = MISSING  # a .jsonl/.json/.parquet file of conversations, or a list of them
    weights: list[float] | None = None  # blending weight per path; default: every file once
    format: str = "auto"  # auto (detected per file) | alpaca | sharegpt | openai
    columns: dict[str, str] | None = None  # renames, e.g. {instruction: prompt, output: answer}
    template: str = "auto"  # auto | tokenizer | qwen3 | qwen2_5 | llama3 (auto: tokenizer's own)
    system: str | None = None  # system prompt replacing the data's own (or added where none)
    thinking: str = "on"  # qwen3 <think> blocks: on | off | keep; else passed as enable_thinking
    train_on: str = "assistant"  # loss on: assistant (every turn) | last (final turn) | all tokens
    truncation: str = "right"  # samples over seq_length: right (keep the beginning) | drop
    packing: bool = False  # pack samples into seq_length sequences (needs cu_seqlens attention)
    skip_bad: bool = False  # skip malformed records (counted, reported) instead of stopping
    val_ratio: float = 0.0  # fraction of every file held out for validation; 0: none
    val_path: Any | None = None  # validation file(s) instead of a val_ratio split
    cache_dir: str | None = None  # tokenized data; default $MTRAIN_CACHE or ~/.cache/mtrain/data
    workers: int = 1  # tokenization worker processes (1: in-process, the tokenizer's own threads)
    seed: int = 0  # seed of the val_ratio split, apart from train.seed so the split stays put

    column_names: ClassVar[tuple[str, ...]] = COLUMN_NAMES  # what data.columns may rename

    def paths(self) -> list[str]:
        """`path` as a list, whatever form the config gave it in."""
        return _as_list(self.path)

    def val_paths(self) -> list[str]:
        return [] if self.val_path is None else _as_list(self.val_path)

    def validate(self) -> SFTDataConfig:
        paths = self.paths()
        if not paths:
            raise ConfigError("data.path is empty; give a .jsonl/.json/.parquet file or a list")
        for key, allowed in (
            ("format", FORMATS), ("template", TEMPLATES), ("thinking", THINKING),
            ("train_on", TRAIN_ON), ("truncation", TRUNCATION),
        ):  # fmt: skip
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"data.{key}={getattr(self, key)} is not one of {', '.join(allowed)}"
                )
        for name, column in (self.columns or {}).items():
            if name not in self.column_names:
                raise ConfigError(
                    f"data.columns.{name} is not a renamable field; known: "
                    + ", ".join(self.column_names)
                )
            if not isinstance(column, str) or not column:
                raise ConfigError(f"data.columns.{name}={column!r} must name a field")
        if self.workers < 1:
            raise ConfigError(f"data.workers={self.workers} must be >= 1")
        check_weights(self.weights, paths)
        if not 0.0 <= self.val_ratio < 1.0:
            raise ConfigError(f"data.val_ratio={self.val_ratio} must be in [0, 1)")
        if self.val_ratio > 0 and self.val_path is not None:
            raise ConfigError("give data.val_ratio or data.val_path, not both")
        if self.val_path is not None and not self.val_paths():
            raise ConfigError("data.val_path is empty; give a file, a list, or null")
        return self


def _as_list(value: Any) -> list[str]:
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    return [str(p) for p in value]
