"""KTO data: unpaired responses, each labelled desirable or not (TRL's unpaired preference
layout) -> cached tokenized conversations -> items of the sample and a mismatched twin.

    {"prompt": str | [{"role", "content"}, ...], "completion": str | {"role": "assistant",
     "content"} | [messages...], "label": true | false, "system"?: str}

`data.columns` renames prompt, completion and label (and the message fields role/content). A
completion given as a list of messages is read as pairs.py reads TRL's conversational
responses. Each record is tokenized as one conversation, prompt + completion, with the loss on
the completion only (a `kto` cache entry, sft_cache.py); the labels are read from the file
again when the dataset is built (a JSON pass, no tokenizing) and must match the entry's records.

A `KTODataset` item has `tokens`, `labels`, `loss_mask`, `position_ids` [2, seq_length] and
`pair`, `label`: row 0 is the sample, row 1 the same prompt with the completion of the sample
before it in the dataset's unshuffled list (the last one's for the first): the mismatched pair
whose log-ratio estimates KTO's KL term, as TRL builds it, spliced from the cached tokens (the
prompt's tokens up to its first trained one, then the other sample's completion tokens). The
pairing is fixed per sample, so a cache of reference log-probs holds both rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtrain.config.sft_data import SFTDataConfig
from mtrain.data import formats, packing
from mtrain.data.pairs import ITEM_KEYS, _prompt_turns, _response
from mtrain.data.sft import build_datasets
from mtrain.data.sft_cache import Kind, TokenizedFile
from mtrain.errors import ConfigError, DataError

COLUMNS = {
    "kto": {
        "prompt": "prompt", "completion": "completion", "label": "label", "role": "role",
        "content": "content", "system": "system",
    }
}  # fmt: skip


def to_sample(record: Any, names: dict[str, str]) -> tuple[formats.Messages, bool]:
    """(the conversation prompt + completion, desirable) of one record."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    for key in ("prompt", "completion", "label"):
        if names[key] not in record:
            fields = ", ".join(map(repr, list(record)[:8]))
            raise DataError(
                f"no field {names[key]!r} (fields: {fields}); KTO records need prompt, "
                "completion and label (data.columns renames them)"
            )
    label = record[names["label"]]
    if not isinstance(label, bool):
        raise DataError(f"field {names['label']!r} must be true or false, got {label!r}")
    turns = _prompt_turns(record[names["prompt"]], names["prompt"], "openai", names)
    system = formats.field_text(record, names["system"], optional=True)
    prompt = ([{"role": "system", "content": system}] if system else []) + turns
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError("the prompt must end with a user turn")
    completion = _response(record, names["completion"], turns, names)
    if not completion.strip():
        raise DataError(f"the completion ({names['completion']!r}) is empty")
    conversation = prompt + [{"role": "assistant", "content": completion}]
    formats.check(conversation)
    return conversation, label


def read_samples(path: Path, cfg: SFTDataConfig, stats: formats.ReadStats):
    names = formats.columns_for("kto", cfg.columns, COLUMNS)
    return formats.parsed(path, "kto", stats, lambda r: "kto", lambda r, f: to_sample(r, names))


def _read_conversations(path: Path, cfg: SFTDataConfig, stats: formats.ReadStats):
    for where, (conversation, _) in read_samples(path, cfg, stats):
        yield where, [conversation]


KTO = Kind("kto", _read_conversations, unit="samples")


def read_labels(entry: TokenizedFile, cfg: SFTDataConfig) -> np.ndarray:
    """The desirable labels of an entry's records, read from its source file again."""
    source = Path(entry.meta["source"])
    stats = formats.ReadStats(cfg.skip_bad)
    labels = np.array([label for _, (_, label) in read_samples(source, cfg, stats)], dtype=bool)
    if len(labels) != len(entry):
        raise DataError(
            f"{source}: {len(labels)} readable records but {len(entry)} tokenized ones (the "
            "tokenizer refused a record that data.skip_bad skipped); fix or remove that record"
        )
    return labels


class KTODataset(torch.utils.data.Dataset):
    """The samples `picks` (file, sample) refer to, each with its mismatched twin."""

    def __init__(
        self,
        files: list[TokenizedFile],
        labels: list[np.ndarray],
        picks: np.ndarray,
        seq_length: int,
        pad_id: int,
        truncation: str = "right",
        seed: int = 0,
    ):
        if seq_length < 2:
            raise ConfigError(f"seq_length={seq_length} must be >= 2")
        self.files, self.seq_length, self.pad_id = files, seq_length, pad_id
        picks = np.asarray(picks, dtype=np.int64).reshape(-1, 2)
        lengths, first = np.zeros(len(picks), np.int64), np.zeros(len(picks), np.int64)
        for k, f in enumerate(files):
            at = picks[:, 0] == k
            lengths[at], first[at] = f.lengths[picks[at, 1]], f.first[picks[at, 1]]
        over = lengths > seq_length
        keep = ~over if truncation == "drop" else np.ones(len(picks), dtype=bool)
        keep &= first < np.minimum(lengths, seq_length)  # a trained token within seq_length
        self.refs = picks[keep]
        self.label = np.array([labels[f][j] for f, j in self.refs], dtype=bool)
        self.order = np.random.default_rng(seed).permutation(len(self.refs))
        self.stats = {
            "samples": len(self.refs),
            "desirable": int(self.label.sum()),
            "dropped": int((~keep).sum()),
        }

    def __len__(self) -> int:
        return len(self.refs)

    def _tokens(self, r: int) -> tuple[np.ndarray, np.ndarray, int]:
        f, j = self.refs[r]
        ids, mask = self.files[f].sample(int(j))
        return ids, mask, int(self.files[f].first[j])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = int(self.order[i])
        ids, mask, first = self._tokens(r)
        other, other_mask, other_first = self._tokens((r - 1) % len(self.refs))
        twin = (
            np.concatenate([ids[:first], other[other_first:]]),
            np.concatenate([np.zeros(first, np.uint8), other_mask[other_first:]]),
        )
        n = self.seq_length
        rows = [
            packing.sequence([(a[:n], m[:n])], n, self.pad_id, 3) for a, m in [(ids, mask), twin]
        ]
        item = {k: torch.stack([row[k] for row in rows]) for k in ITEM_KEYS}
        item["pair"] = torch.tensor(r, dtype=torch.int64)
        item["label"] = torch.tensor(float(self.label[r]))
        return item

    def describe(self, name: str) -> str:
        s = self.stats
        line = (
            f"kto {name}: {s['samples']:,} samples ({s['desirable']:,} desirable, "
            f"{s['samples'] - s['desirable']:,} undesirable), each with a mismatched twin "
            f"-> 2 x {s['samples']:,} padded sequences of {self.seq_length}"
        )
        if s["dropped"]:
            line += f"; dropped {s['dropped']:,} over-long or untrained sample(s)"
        return line


def build_kto_datasets(
    cfg: SFTDataConfig, tokenizer_dir: str, seq_length: int, seed: int
) -> tuple[KTODataset, KTODataset | None]:
    """(train, validation or None) as `build_pair_datasets`, of labelled samples."""
    labels: dict[str, np.ndarray] = {}

    def make(files: list[TokenizedFile], picks: np.ndarray, pad_id: int) -> KTODataset:
        for f in files:
            if str(f.prefix) not in labels:
                labels[str(f.prefix)] = read_labels(f, cfg)
        per_file = [labels[str(f.prefix)] for f in files]
        return KTODataset(files, per_file, picks, seq_length, pad_id, cfg.truncation, seed)

    return build_datasets(cfg, tokenizer_dir, seq_length, seed, KTO, make)
