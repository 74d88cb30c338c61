"""DPO data: preference pairs -> cached tokenized (chosen, rejected) conversations -> item pairs.

A pair is a prompt (a conversation ending with a user turn) and two responses to it. Three
record layouts are read (per file, detected from its first usable record, or `data.format`):

    alpaca    {"instruction", "input"?, "system"?, "history"?, "chosen": str, "rejected": str}
              (the prompt is built as SFT's alpaca builds it, formats.py)
    sharegpt  {"conversations": [{"from", "value"}, ...], "system"?,
               "chosen"/"rejected": str | {"from": "gpt", "value"}}
    openai    {"messages" | "prompt": str | [{"role", "content"}, ...], "system"?,
               "chosen"/"rejected": str | {"role": "assistant", "content"} | [messages...]}

An openai response given as a list of messages is TRL's conversational preference format: its
last message is the response; any messages before it repeat the prompt and must equal it.
`data.columns` renames chosen, rejected, prompt, conversations and SFT's names. A malformed
record names its `file:line`, or with `data.skip_bad` is skipped and counted.

Each pair is tokenized as two conversations, prompt + chosen and prompt + rejected, with the chat
template and loss mask of SFT's `train_on=last` (labels on the final response and its end of
turn only), into a `pairs` cache entry (sft_cache.py): samples 2i and 2i + 1 are pair i's.

A `PairDataset` item is one pair in a seeded order: `tokens`, `labels`, `loss_mask` and
`position_ids` as SFT's padded sequences (packing.py), each [2, seq_length] with row 0 the chosen
and row 1 the rejected conversation, and `pair`, the pair's index in the dataset's unshuffled
list (what a cache of reference log-probs is indexed by). Over-long sequences keep their first
seq_length tokens (`data.truncation=right`), or the pair is dropped if either side is over
(`drop`); a pair with a side left without a trained token is dropped either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from mtrain.config.dpo_data import DPODataConfig
from mtrain.config.sft_data import SFTDataConfig
from mtrain.data import formats, packing
from mtrain.data.sft import build_datasets
from mtrain.data.sft_cache import Kind, TokenizedFile
from mtrain.errors import ConfigError, DataError

__all__ = [
    "Pair", "PairDataset", "PairFile", "WithMargins", "build_pair_datasets", "read_margins",
    "read_pairs",
]  # fmt: skip

SIDES = ("chosen", "rejected")
ITEM_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
COLUMNS = {  # per layout, the default field names `data.columns` may rename
    "alpaca": {
        "instruction": "instruction", "input": "input", "system": "system",
        "history": "history", "chosen": "chosen", "rejected": "rejected",
    },
    "sharegpt": {
        "conversations": "conversations", "role": "from", "content": "value",
        "system": "system", "chosen": "chosen", "rejected": "rejected",
        **dict.fromkeys(formats.SPEAKER_TAGS),
    },
    "openai": {
        "messages": "messages", "prompt": "prompt", "role": "role", "content": "content",
        "system": "system", "chosen": "chosen", "rejected": "rejected",
        **dict.fromkeys(formats.SPEAKER_TAGS),
    },
}  # fmt: skip
PROMPT_KEYS = {"sharegpt": ("conversations",), "openai": ("messages", "prompt")}


class Pair(NamedTuple):
    prompt: formats.Messages  # ends with a user turn
    chosen: str
    rejected: str

    def conversations(self) -> list[formats.Messages]:
        return [self.prompt + [{"role": "assistant", "content": r}] for r in self[1:]]


def read_pairs(
    path: Path, cfg: SFTDataConfig, stats: formats.ReadStats
) -> Iterator[tuple[str, Pair]]:
    """(location, pair) of every good record of `path`; bad records go to `stats`."""
    cfg = cfg.for_file(path)
    names = {f: formats.columns_for(f, cfg.columns, COLUMNS) for f in COLUMNS}
    return formats.parsed(
        path, cfg.format, stats, lambda r: _layout(r, names), lambda r, f: to_pair(r, f, names[f])
    )


def _layout(record: Any, names: dict[str, dict[str, str]]) -> str:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    for fmt, keys in (*PROMPT_KEYS.items(), ("alpaca", ("instruction",))):
        if any(names[fmt][k] in record for k in keys):
            return fmt
    fields = ", ".join(map(repr, list(record)[:8])) or "none"
    raise DataError(
        f"cannot tell the preference record format (fields: {fields}); set "
        "data.format=alpaca|sharegpt|openai and data.columns to name the fields"
    )


def to_pair(record: Any, fmt: str, names: dict[str, str]) -> Pair:
    """The checked pair of one record of layout `fmt` with field `names`."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        prompt = formats.alpaca_prompt(record, names)
        responses = [formats.field_text(record, names[side]) for side in SIDES]
    else:
        key = next((names[k] for k in PROMPT_KEYS[fmt] if names[k] in record), None)
        if key is None:
            wanted = " or ".join(repr(names[k]) for k in PROMPT_KEYS[fmt])
            raise DataError(f"no prompt field {wanted}; set data.columns.{PROMPT_KEYS[fmt][-1]}")
        turns = _prompt_turns(record[key], key, fmt, names)
        system = formats.field_text(record, names["system"], optional=True)
        prompt = ([{"role": "system", "content": system}] if system else []) + turns
        responses = [_response(record, names[side], turns, names) for side in SIDES]
    if not prompt:
        raise DataError("the prompt is empty")
    if prompt[-1]["role"] != "user":
        raise DataError(f"the prompt ends with a {prompt[-1]['role']} turn, not a user turn")
    for side, text in zip(SIDES, responses):
        if not text.strip():
            raise DataError(f"the {side} response ({names[side]!r}) is empty")
    pair = Pair(prompt, *responses)
    formats.check(pair.conversations()[0])  # one system message, first; turns from a user
    return pair


def _prompt_turns(value: Any, key: str, fmt: str, names: dict[str, str]) -> formats.Messages:
    if isinstance(value, str) and fmt == "openai":
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise DataError(f"field {key!r} must be a list of messages, got {type(value).__name__}")
    return [formats.to_message(t, f"{key!r} message {n}", names) for n, t in enumerate(value, 1)]


def _response(record: dict, key: str, prompt: formats.Messages, names: dict[str, str]) -> str:
    """A sharegpt/openai response: a string, an assistant message, or a list of messages ending
    with it (TRL's form), where those before it repeat the prompt's turns."""
    value = record.get(key)
    if value is None:
        fields = ", ".join(map(repr, list(record)[:8]))
        raise DataError(f"no field {key!r} (fields: {fields}); set data.columns")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        turns = [
            formats.to_message(t, f"{key!r} message {n}", names) for n, t in enumerate(value, 1)
        ]
        if len(turns) > 1 and turns[:-1] != prompt:
            raise DataError(
                f"{key!r} repeats a prompt that differs from the record's; give the response "
                "alone, or the prompt's messages unchanged before it"
            )
        message = turns[-1]
    else:
        message = formats.to_message(value, f"field {key!r}", names)
    if message["role"] != "assistant":
        raise DataError(f"{key!r} is a {message['role']} message, not an assistant response")
    return message["content"]


class PairFile(TokenizedFile):
    """A `pairs` cache entry, by pair: `lengths` and `first` are [pairs, 2] (chosen, rejected)."""

    def __init__(self, prefix: Path):
        super().__init__(prefix)
        if len(self.first) % 2:
            raise DataError(f"{prefix}.*: a pairs entry with an odd number of samples; delete it")
        self.first = self.first.reshape(-1, 2)

    @property
    def lengths(self) -> np.ndarray:
        return self.tokens.lengths.reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.first)

    def pair(self, i: int, lengths: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids, trained mask) of pair i's chosen and rejected sides, cut to `lengths`."""
        return [self.sample(2 * i + s, int(lengths[s])) for s in range(2)]


def _read_conversations(path: Path, cfg: SFTDataConfig, stats: formats.ReadStats):
    for where, pair in read_pairs(path, cfg, stats):
        yield where, pair.conversations()


PAIRS = Kind("pairs", _read_conversations, unit="pairs", size=2, entry=PairFile)


class PairDataset(torch.utils.data.Dataset):
    """The pairs `picks` (file, pair) refer to, each as two padded rows of `seq_length`.

    Built by `build_pair_datasets`; `stats` holds the counts logged for it.
    """

    def __init__(
        self,
        files: list[PairFile],
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
        lengths, first = np.zeros((len(picks), 2), np.int64), np.zeros((len(picks), 2), np.int64)
        for k, f in enumerate(files):
            at = picks[:, 0] == k
            lengths[at], first[at] = f.lengths[picks[at, 1]], f.first[picks[at, 1]]
        over = (lengths > seq_length).any(axis=1)
        keep = ~over if truncation == "drop" else np.ones(len(picks), dtype=bool)
        lengths = np.minimum(lengths, seq_length)
        untrained = keep & (first >= lengths).any(axis=1)  # e.g. a prompt over seq_length
        keep &= ~untrained
        self.refs, self.lengths = picks[keep], lengths[keep]
        self.order = np.random.default_rng(seed).permutation(len(self.refs))
        tokens = int(self.lengths.sum())
        self.stats = {
            "pairs": len(self.refs),
            "tokens": tokens,
            "padding": 1 - tokens / max(2 * len(self.refs) * seq_length, 1),
            "truncated": int((over & keep).sum()) if truncation == "right" else 0,
            "dropped_long": int(over.sum()) if truncation == "drop" else 0,
            "dropped_untrained": int(untrained.sum()),
        }

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def num_pairs(self) -> int:
        return len(self)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = int(self.order[i])
        f, p = self.refs[r]
        rows = [  # cu_len 3: [0, length, seq_length]; the cu_seqlens are dropped below
            packing.sequence([side], self.seq_length, self.pad_id, 3)
            for side in self.files[f].pair(int(p), self.lengths[r])
        ]
        item = {k: torch.stack([row[k] for row in rows]) for k in ITEM_KEYS}
        item["pair"] = torch.tensor(r, dtype=torch.int64)
        return item

    def describe(self, name: str) -> str:
        s = self.stats
        line = (
            f"dpo {name}: {s['pairs']:,} pairs, {s['tokens']:,} tokens -> 2 x {s['pairs']:,} "
            f"padded sequences of {self.seq_length}, {s['padding']:.1%} padding"
        )
        if s["truncated"]:
            line += f"; truncated {s['truncated']:,} over-long pair(s) (data.truncation=right)"
        if s["dropped_long"]:
            line += f"; dropped {s['dropped_long']:,} over-long pair(s) (data.truncation=drop)"
        if s["dropped_untrained"]:
            line += (
                f"; dropped {s['dropped_untrained']:,} pair(s) with a side that has no trained "
                "token within seq_length"
            )
        return line


def build_pair_datasets(
    cfg: DPODataConfig, tokenizer_dir: str, seq_length: int, seed: int
) -> tuple[PairDataset, PairDataset | None]:
    """(train, validation or None) as SFT's `build_sft_datasets`, of pairs; `seed` orders them."""

    def make(files: list[PairFile], picks: np.ndarray, pad_id: int) -> PairDataset:
        return PairDataset(files, picks, seq_length, pad_id, cfg.truncation, seed)

    return build_datasets(cfg, tokenizer_dir, seq_length, seed, PAIRS, make)


def read_margins(entry: PairFile, cfg: SFTDataConfig) -> np.ndarray | None:
    """The `margin` column (`data.columns.margin` renames it) of an entry's pairs, read from its
    source file again (a JSON pass, no tokenizing): a reward model's per-pair margin. None when
    no record has one; every record must have one otherwise."""
    source = Path(entry.meta["source"])
    cfg = cfg.for_file(source)
    key = (cfg.columns or {}).get("margin", "margin")
    names = {f: formats.columns_for(f, cfg.columns, COLUMNS) for f in COLUMNS}

    def parse(record: Any, fmt: str) -> float | None:
        to_pair(record, fmt, names[fmt])  # the same records as the cache entry holds
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DataError(f"field {key!r} must be a number, got {value!r}")
        return value

    stats = formats.ReadStats(cfg.skip_bad)
    values = [
        v for _, v in formats.parsed(source, cfg.format, stats, lambda r: _layout(r, names), parse)
    ]
    if len(values) != len(entry):
        raise DataError(
            f"{source}: {len(values)} readable pairs but {len(entry)} tokenized ones (the "
            "tokenizer refused a pair that data.skip_bad skipped); fix or remove that record"
        )
    given = [v is not None for v in values]
    if not any(given):
        return None
    if not all(given):
        raise DataError(
            f"{source}: record {given.index(False) + 1} has no {key!r} while others do; give "
            "every pair a margin or none"
        )
    return np.asarray(values, dtype=np.float32)


class WithMargins(torch.utils.data.Dataset):
    """A pair dataset whose items also carry their pair's `margin` (per file, by pair)."""

    def __init__(self, dataset: PairDataset, margins: list[np.ndarray]):
        self.dataset, self.margins = dataset, margins

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[i])
        f, p = self.dataset.refs[int(item["pair"])]
        item["margin"] = torch.tensor(float(self.margins[f][p]))
        return item
