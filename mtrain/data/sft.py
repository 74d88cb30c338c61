"""SFT data: conversation files -> cached tokenized samples with loss masks -> training sequences.

    load_conversations    records of any supported layout -> [{"role", "content"}, ...] (formats.py)
    tokenize_conversation one conversation -> input_ids and labels (templates.py, masking.py)
    build_sft_datasets    files -> (train, validation) SFTDatasets, through the cache (sft_cache.py)
    build_datasets        the same for any cache kind and dataset (DPO's pairs.py uses it)

A dataset is one pass over its samples in a seeded order. Each item is a sequence of exactly
`seq_length` positions (packing.py describes its tensors): with `data.packing` several samples
packed best-fit-decreasing, otherwise one sample padded to seq_length (a fixed shape keeps
micro-batches, pipeline stages and compiled kernels on one shape).

Samples longer than seq_length keep their first seq_length tokens (`data.truncation=right`) or
are dropped (`drop`); a sample left with no trained token within seq_length is dropped either
way. Both are counted in the dataset's log line and `stats`.

Several files are blended by `data.weights`: the blend has as many samples as the files
together, drawn from each in proportion to its weight (cycling through a file in fresh seeded
orders when it is drawn more often than it has samples), with PT's `blend` placing the draws.
The validation set is `data.val_path`, or `data.val_ratio` of every file held out before
blending (seeded by `data.seed`), so it never overlaps the training samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from mtrain.config.sft_data import SFTDataConfig
from mtrain.data import formats, packing
from mtrain.data.masking import ChatEncoder
from mtrain.data.pt import blend
from mtrain.data.sft_cache import SFT, ChatTokenizer, Kind, TokenizedFile, tokenize_file
from mtrain.data.templates import resolve_template
from mtrain.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "SFTDataset", "block_causal_mask", "build_datasets", "build_sft_datasets", "load_conversations",
    "tokenize_conversation",
]  # fmt: skip

log = logging.getLogger("mtrain.data")
block_causal_mask = packing.block_causal_mask


def load_conversations(cfg: SFTDataConfig, paths) -> list[list[dict]]:
    """Every good record of `paths` (a path or a list) as a conversation, in file order."""
    out = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        stats = formats.ReadStats(cfg.skip_bad)
        file_cfg = cfg.for_file(path)
        out += [
            m
            for _, m in formats.conversations(Path(path), file_cfg.format, file_cfg.columns, stats)
        ]
        if stats.bad:
            log.info(
                "data: %s: skipped %d malformed record(s) (data.skip_bad), first: %s",
                path, stats.bad, stats.first_bad,
            )  # fmt: skip
    return out


def tokenize_conversation(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, cfg: SFTDataConfig
) -> dict[str, list[int]]:
    """{"input_ids", "labels"} of one conversation; labels are -100 except on trained tokens,
    at the same positions as input_ids (not shifted)."""
    template = resolve_template(cfg.template, tokenizer, cfg.system, cfg.thinking)
    (encoded,) = ChatEncoder(tokenizer, template, cfg.train_on).encode([messages])
    return {"input_ids": encoded.ids, "labels": encoded.labels()}


class SFTDataset(torch.utils.data.Dataset):
    """Sequences of `seq_length` positions made of the samples `picks` (file, sample) refer to.

    Built by `build_sft_datasets`; `stats` holds the counts logged for it.
    """

    def __init__(
        self,
        files: list[TokenizedFile],
        picks: np.ndarray,
        seq_length: int,
        pad_id: int,
        truncation: str = "right",
        pack: bool = False,
        seed: int = 0,
    ):
        if seq_length < 2:
            raise ConfigError(f"seq_length={seq_length} must be >= 2")
        self.files, self.seq_length, self.pad_id, self.pack = files, seq_length, pad_id, pack
        picks = np.asarray(picks, dtype=np.int64).reshape(-1, 2)
        lengths, first = np.zeros(len(picks), np.int64), np.zeros(len(picks), np.int64)
        for k, f in enumerate(files):
            at = picks[:, 0] == k
            lengths[at], first[at] = f.lengths[picks[at, 1]], f.first[picks[at, 1]]
        over = lengths > seq_length
        keep = ~over if truncation == "drop" else np.ones(len(picks), dtype=bool)
        lengths = np.minimum(lengths, seq_length)
        untrained = keep & (first >= lengths)  # e.g. a prompt longer than seq_length
        keep &= ~untrained
        self.refs, self.lengths = picks[keep], lengths[keep]
        rng = np.random.default_rng(seed)
        if pack:
            bins = packing.best_fit_decreasing(self.lengths, seq_length)
            bins = [bins[b] for b in rng.permutation(len(bins))]
            self.order = np.array([i for b in bins for i in b], dtype=np.int64)
            self.bounds = np.cumsum([0] + [len(b) for b in bins], dtype=np.int64)
            # cu_seqlens holds 0, the end of every sample, and seq_length closing any padding.
            ends = [len(b) + 1 + (self.lengths[b].sum() < seq_length) for b in bins]
            self.cu_len = max([3, *ends])
        else:  # a sequence per sample: [0, length, seq_length] at most
            self.order = rng.permutation(len(self.refs)).astype(np.int64)
            self.bounds = np.arange(len(self.refs) + 1, dtype=np.int64)
            self.cu_len = 3
        tokens, sequences = int(self.lengths.sum()), len(self.bounds) - 1
        self.stats = {
            "samples": len(self.refs),
            "sequences": sequences,
            "tokens": tokens,
            "padding": 1 - tokens / max(sequences * seq_length, 1),
            "truncated": int((over & keep).sum()) if truncation == "right" else 0,
            "dropped_long": int(over.sum()) if truncation == "drop" else 0,
            "dropped_untrained": int(untrained.sum()),
        }

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        samples = []
        for r in self.order[self.bounds[i] : self.bounds[i + 1]]:
            f, j = self.refs[r]
            samples.append(self.files[f].sample(int(j), int(self.lengths[r])))
        return packing.sequence(samples, self.seq_length, self.pad_id, self.cu_len)

    def describe(self, name: str) -> str:
        s = self.stats
        kind = "packed sequences" if self.pack else "padded sequences"
        line = (
            f"sft {name}: {s['samples']:,} samples, {s['tokens']:,} tokens -> {s['sequences']:,} "
            f"{kind} of {self.seq_length}, {s['padding']:.1%} padding"
        )
        if s["truncated"]:
            line += f"; truncated {s['truncated']:,} over-long sample(s) (data.truncation=right)"
        if s["dropped_long"]:
            line += f"; dropped {s['dropped_long']:,} over-long sample(s) (data.truncation=drop)"
        if s["dropped_untrained"]:
            line += f"; dropped {s['dropped_untrained']:,} with no trained token within seq_length"
        return line


def build_sft_datasets(
    cfg: SFTDataConfig, tokenizer_dir: str, seq_length: int, seed: int
) -> tuple[SFTDataset, SFTDataset | None]:
    """(train, validation or None), tokenized through the cache; `seed` orders the samples."""

    def make(files: list[TokenizedFile], picks: np.ndarray, pad_id: int) -> SFTDataset:
        return SFTDataset(files, picks, seq_length, pad_id, cfg.truncation, cfg.packing, seed)

    return build_datasets(cfg, tokenizer_dir, seq_length, seed, SFT, make)


def build_datasets(
    cfg: SFTDataConfig,
    tokenizer_dir: str,
    seq_length: int,
    seed: int,
    kind: Kind,
    make: Callable[[list[TokenizedFile], np.ndarray, int], Dataset],
) -> tuple[Dataset, Dataset | None]:
    """(train, validation or None) of `kind`'s cache entries, each set made by
    `make(files, (file, record) picks, pad_id)`, a dataset with `describe(name)`."""
    cfg.validate()
    with ChatTokenizer(cfg, tokenizer_dir) as chat:
        files = [tokenize_file(Path(p), cfg, chat, kind) for p in cfg.paths()]
        val_files = [tokenize_file(Path(p), cfg, chat, kind) for p in cfg.val_paths()]
    train_pools, val_pools = split(files, cfg.val_ratio, cfg.seed)
    train_pools = drawn(train_pools, cfg.sample_counts(), cfg.seed)
    picks = blended_picks(train_pools, cfg.weights, seed)

    def build(fs: list[TokenizedFile], ps: np.ndarray, name: str) -> Dataset:
        ds = make(fs, ps, chat.pad_id)
        if len(ds) == 0:
            raise DataError(
                f"the {name} set has no {kind.unit} left within seq_length={seq_length}"
            )
        log.info("data: %s", ds.describe(name))
        return ds

    train = build(files, picks, "train")
    if val_files:
        pools = [np.arange(len(f)) for f in val_files]
        return train, build(val_files, _concat(pools), "validation")
    if cfg.val_ratio > 0:
        if not sum(map(len, val_pools)):
            raise ConfigError(f"data.val_ratio={cfg.val_ratio} holds out no {kind.unit}; raise it")
        return train, build(files, _concat(val_pools), "validation")
    return train, None


def split(
    files: list[TokenizedFile], ratio: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per file, (training record indices, held-out record indices): a seeded `ratio` of each
    (a record is a sample, or a pair of a pairs entry: `len(file)` counts them)."""
    train, val = [], []
    for k, f in enumerate(files):
        n = len(f)
        held = int(round(ratio * n))
        if ratio > 0 and held >= n:
            raise ConfigError(
                f"data.val_ratio={ratio} leaves no training sample of {f.meta['source']}"
            )
        order = np.random.default_rng([seed, k, n]).permutation(n)
        val.append(np.sort(order[:held]))
        train.append(np.sort(order[held:]))
    return train, val


def drawn(
    pools: list[np.ndarray], counts: list[tuple[list[int], int]], seed: int
) -> list[np.ndarray]:
    """`pools` with the files of each (files, n) of `counts` cut or grown to n samples in all
    (a dataset's num_samples): a seeded draw that takes every sample once before any twice."""
    pools = list(pools)
    for files, n in counts:
        rows = _concat([pools[k] for k in files])
        if not len(rows):
            continue
        rng = np.random.default_rng([seed, files[0], n])
        order = np.concatenate([rng.permutation(len(rows)) for _ in range(-(-n // len(rows)))])[:n]
        taken = rows[np.sort(order)]
        for j, k in enumerate(files):
            pools[k] = taken[taken[:, 0] == j, 1]
    return pools


def blended_picks(pools: list[np.ndarray], weights: list[float] | None, seed: int) -> np.ndarray:
    """(file, sample) rows: every pool once, or with `weights` a blend of as many draws."""
    if weights is None:
        return _concat(pools)
    total = sum(len(p) for p in pools)
    source, index = blend(list(weights), total)
    picks = np.empty((total, 2), dtype=np.int64)
    picks[:, 0] = source
    for k, pool in enumerate(pools):
        at = source == k
        if not at.any():
            continue
        if not len(pool):
            raise DataError(f"data.weights gives file {k + 1} weight {weights[k]}, but no samples")
        # The j-th draw of a file is sample j of its passes, each pass a fresh seeded order.
        rng = np.random.default_rng([seed, k])
        passes = -(-int(at.sum()) // len(pool))
        order = np.concatenate([rng.permutation(len(pool)) for _ in range(passes)])
        picks[at, 1] = pool[order[index[at]]]
    return picks


def _concat(pools: list[np.ndarray]) -> np.ndarray:
    rows = [np.stack([np.full(len(p), k), p], axis=1) for k, p in enumerate(pools)]
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 2), np.int64)
