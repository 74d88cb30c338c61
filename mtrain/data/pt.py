"""Pretraining samples: GPT-style windows over shuffled epochs of documents, and their blend.

For one dataset, epoch e is a permutation of the documents; the epochs are concatenated into
one token stream and sample j (before shuffling) is `stream[j*L : j*L + L + 1]` for sequence
length L, so consecutive samples share one token (the last label of one is the first input of
the next). Just enough epochs are drawn for `num_samples` samples, and the samples are shuffled.

The index is two arrays, built with numpy in well under a second for a million documents and
cached next to the dataset (`<prefix>.pt-<key>.{docs,samples}.npy`):
    docs[k]     the document at position k of the stream
    samples[i]  (k, offset): sample i starts `offset` tokens into the document at position k
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from mtrain.checkpoint.atomic import atomic_paths
from mtrain.config.data import DataConfig
from mtrain.data.corpus import prepare_corpus
from mtrain.data.indexed import IndexedTokens
from mtrain.errors import ConfigError, DataError

__all__ = ["BlendedDataset", "PTDataset", "blend", "build_pt_dataset", "prepare_corpus"]

log = logging.getLogger("mtrain.data")

INDEX_VERSION = 1  # bump when the index built for the same inputs changes


class PTDataset(torch.utils.data.Dataset):
    """Samples of seq_length+1 tokens cut from the concatenation of the documents (GPT style),
    over as many shuffled epochs as needed to provide num_samples samples. Deterministic in
    (prefix contents, seq_length, num_samples, seed)."""

    def __init__(self, prefix: Path, seq_length: int, num_samples: int, seed: int):
        if seq_length < 1 or num_samples < 0:
            raise ConfigError(
                f"seq_length={seq_length} must be >= 1, num_samples={num_samples} >= 0"
            )
        self.data = IndexedTokens(prefix)
        self.seq_length = seq_length
        if num_samples and self.data.num_tokens == 0:
            raise DataError(f"{prefix}: the dataset holds no tokens")
        self.docs, self.samples = _load_or_build_index(self.data, seq_length, num_samples, seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k, offset = (int(v) for v in self.samples[i])
        need, pieces = self.seq_length + 1, []
        while need:
            doc = int(self.docs[k])
            piece = self.data.get(doc, offset, min(int(self.data.lengths[doc]) - offset, need))
            pieces.append(piece)
            need -= len(piece)
            k, offset = k + 1, 0
        window = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
        return {
            "tokens": window[:-1],
            "labels": window[1:],
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }


def build_index(
    lengths: np.ndarray, seq_length: int, num_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(docs, samples) as described in the module docstring."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n_docs, per_epoch = len(lengths), int(lengths.sum())
    # The last sample needs one token past its window.
    epochs = -(-(num_samples * seq_length + 1) // per_epoch) if num_samples else 0
    # int32 while positions fit (Megatron's choice too): the index is 8 bytes per sample.
    small = np.int32 if epochs * n_docs < 2**31 else np.int64
    doc_rng, sample_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    order = np.broadcast_to(np.arange(n_docs, dtype=small), (epochs, n_docs))
    docs = doc_rng.permuted(order, axis=1).reshape(-1)
    ends = np.cumsum(lengths[docs])  # stream position just past each document
    starts = np.arange(num_samples, dtype=np.int64) * seq_length
    k = np.searchsorted(ends, starts, side="right")
    offsets = starts - (ends[k] - lengths[docs[k]])  # < a document's length: fits int32
    samples = np.stack([k.astype(small), offsets.astype(small)], axis=1)
    return docs, samples[sample_rng.permutation(num_samples)]


def _load_or_build_index(data: IndexedTokens, seq_length: int, num_samples: int, seed: int):
    if num_samples == 0:
        return build_index(data.lengths, seq_length, num_samples, seed)
    digest = hashlib.sha256(np.ascontiguousarray(data.lengths).tobytes())
    digest.update(f"{INDEX_VERSION}/{seq_length}/{num_samples}/{seed}".encode())
    stem = f"{data.prefix}.pt-s{seq_length}-n{num_samples}-seed{seed}-{digest.hexdigest()[:12]}"
    paths = Path(f"{stem}.docs.npy"), Path(f"{stem}.samples.npy")
    if all(p.is_file() for p in paths):
        return tuple(np.load(p, mmap_mode="r") for p in paths)
    arrays = build_index(data.lengths, seq_length, num_samples, seed)
    try:
        with atomic_paths(*paths) as temps:  # samples last: its presence means docs is complete
            for temp, array in zip(temps, arrays):
                with open(temp, "wb") as f:
                    np.save(f, array)
    except OSError as err:  # e.g. a read-only dataset directory: keep the index in memory
        log.warning("data: could not cache the sample index next to %s (%s)", data.prefix, err)
    return arrays


class BlendedDataset(torch.utils.data.Dataset):
    """Sample i is sample `index[i]` of `datasets[source[i]]`."""

    def __init__(self, datasets: list, source: np.ndarray, index: np.ndarray):
        self.datasets, self.source, self.index = datasets, source, index

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.datasets[int(self.source[i])][int(self.index[i])]


def blend(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, index) of `num_samples` draws: sample i is sample index[i] of source[i].

    Source k gets count c_k = w_k * n rounded by largest remainder (so |c_k - w_k n| < 1), and
    its j-th sample is placed at time (j + 1/2) / c_k among the others, so every prefix of the
    blend also follows the weights, within two samples per source (about what Megatron's greedy
    "largest error" loop achieves, here vectorized).
    """
    w = np.asarray(weights, dtype=np.float64)
    quota = w / w.sum() * num_samples
    counts = np.floor(quota).astype(np.int64)
    counts[np.argsort(counts - quota, kind="stable")[: num_samples - counts.sum()]] += 1
    source = np.repeat(np.arange(len(w)), counts)
    index = np.concatenate([np.arange(c) for c in counts])
    order = np.lexsort((source, (index + 0.5) / counts[source]))
    return source[order], index[order]


def build_pt_dataset(
    cfg: DataConfig, tokenizer_dir: str, seq_length: int, num_samples: int, seed: int
) -> torch.utils.data.Dataset:
    """The PT dataset of `cfg`: one PTDataset, or a BlendedDataset when there are several paths."""
    prefixes = prepare_corpus(cfg, tokenizer_dir)
    if len(prefixes) == 1:
        return PTDataset(prefixes[0], seq_length, num_samples, seed)
    weights = cfg.weights or [IndexedTokens(p).num_tokens for p in prefixes]
    source, index = blend(weights, num_samples)
    counts = np.bincount(source, minlength=len(prefixes))
    datasets = [PTDataset(p, seq_length, int(n), seed) for p, n in zip(prefixes, counts)]
    for p, n, w in zip(prefixes, counts, weights):
        log.info("data: blend %s: weight %.4g, %d samples", p.name, w / sum(weights), n)
    return BlendedDataset(datasets, source, index)
