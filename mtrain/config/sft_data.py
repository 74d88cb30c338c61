"""The `data` config group for SFT: conversation files, chat template, loss mask, packing."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from mtrain.config.data import check_weights
from mtrain.data import dataset_info
from mtrain.errors import ConfigError

FORMATS = ("auto", "alpaca", "sharegpt", "openai")
TEMPLATES = ("auto", "tokenizer", "qwen3", "qwen2_5", "llama3")
THINKING = ("on", "off", "keep")
TRAIN_ON = ("assistant", "last", "all")
TRUNCATION = ("right", "drop")
# The names `data.columns` may rename, per record format (see mtrain/data/formats.py).
COLUMN_NAMES = (
    "instruction", "input", "output", "system", "history", "messages", "role", "content",
    "tools", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag",
)  # fmt: skip


@dataclass
class SFTDataConfig:
    path: Any = None  # a .jsonl/.json/.parquet file of conversations, or a list of them
    dataset_info: str | None = None  # LLaMA-Factory's dataset_info.json (or its folder)
    dataset: Any = None  # names described in data.dataset_info ("a,b" or a list), not data.path
    val_dataset: Any = None  # names in data.dataset_info held out for validation
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
    ranking: ClassVar[bool] = False  # the kind of data.dataset entries read: pairs or not

    def paths(self) -> list[str]:
        """The training files: `path` as a list, or data.dataset's files."""
        if self.dataset is not None:
            return [f for d in self.datasets("dataset") for f in d.files]
        return [] if self.path is None else _as_list(self.path)

    def val_paths(self) -> list[str]:
        if self.val_dataset is not None:
            return [f for d in self.datasets("val_dataset") for f in d.files]
        return [] if self.val_path is None else _as_list(self.val_path)

    def datasets(self, key: str) -> list[dataset_info.Dataset]:
        """The LLaMA-Factory datasets config `key` (dataset or val_dataset) names, resolved once."""
        resolved = self.__dict__.setdefault("_resolved", {})
        if key not in resolved:
            names = dataset_info.names_of(getattr(self, key))
            if not names:
                raise ConfigError(f"data.{key} names no dataset; give data.{key}=NAME[,NAME...]")
            if not self.dataset_info:
                raise ConfigError(
                    f"data.{key} names datasets of LLaMA-Factory's dataset_info.json: set "
                    "data.dataset_info=DIR/dataset_info.json"
                )
            resolved[key] = dataset_info.resolve(
                self.dataset_info, names, ranking=self.ranking, key=f"data.{key}"
            )
        return resolved[key]

    def for_file(self, path: str | Path) -> SFTDataConfig:
        """This config as it reads `path`: a data.dataset file with its dataset's layout and
        field names, any other file as data.format and data.columns say."""
        for key in ("dataset", "val_dataset"):
            for d in self.datasets(key) if getattr(self, key) is not None else ():
                if str(path) in d.files:
                    return replace(
                        self, path=str(path), dataset=None, val_dataset=None,
                        format=d.format, columns=d.columns,
                    )  # fmt: skip
        return self

    def sample_counts(self) -> list[tuple[list[int], int]]:
        """(indices in paths(), samples to draw) of every data.dataset with num_samples."""
        if self.dataset is None:
            return []
        out, start = [], 0
        for d in self.datasets("dataset"):
            if d.num_samples is not None:
                out.append((list(range(start, start + len(d.files))), d.num_samples))
            start += len(d.files)
        return out

    def validate(self) -> SFTDataConfig:
        self._check_sources()
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
        if self.dataset is not None and self.weights is not None:
            several = [d.name for d in self.datasets("dataset") if len(d.files) > 1]
            if several:
                raise ConfigError(
                    f"data.weights gives one weight per file, and dataset {several[0]!r} is a "
                    "folder of several; drop data.weights or list its files in data.path"
                )
        check_weights(self.weights, paths)
        if not 0.0 <= self.val_ratio < 1.0:
            raise ConfigError(f"data.val_ratio={self.val_ratio} must be in [0, 1)")
        if self.val_ratio > 0 and self.val_path is not None:
            raise ConfigError("give data.val_ratio or data.val_path, not both")
        if self.val_path is not None and not self.val_paths():
            raise ConfigError("data.val_path is empty; give a file, a list, or null")
        return self

    def _check_sources(self) -> None:
        """data.path or data.dataset (with data.dataset_info), and what goes with each."""
        if self.dataset is None:
            if self.path is None:
                raise ConfigError(
                    "data.path is not set; give data.path=FILE (or a list), or "
                    "data.dataset_info=DIR/dataset_info.json data.dataset=NAME"
                )
            if self.val_dataset is not None:
                raise ConfigError("data.val_dataset goes with data.dataset; use data.val_path")
            return
        if self.path is not None:
            raise ConfigError("give data.path or data.dataset, not both")
        for key, unset in (("format", "auto"), ("columns", None)):
            if getattr(self, key) != unset:
                raise ConfigError(
                    f"data.{key} does not apply to data.dataset: dataset_info.json gives each "
                    f"dataset's formatting and columns; drop data.{key}"
                )
        if self.val_dataset is not None and (self.val_path is not None or self.val_ratio > 0):
            raise ConfigError("give data.val_dataset, data.val_path or data.val_ratio, not two")
        self.datasets("dataset")
        if self.val_dataset is not None:
            self.datasets("val_dataset")


def _as_list(value: Any) -> list[str]:
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    return [str(p) for p in value]
