"""SFT files -> tokenized samples with loss masks, once: the content-addressed cache of SFT data.

An entry is `<cache>/<stem>-<kind>-<key>.*`. Its kind is `sft` (a sample per conversation) or
`pairs` (DPO, pairs.py: samples 2i and 2i + 1 are pair i's chosen and rejected conversations),
so an entry is never read as the other kind. The key hashes the file's bytes, the tokenizer
(its files), the chat template (its source, or the built-in's name and version, with
data.thinking and data.system) and every setting that changes the samples: format, columns,
train_on, skip_bad. seq_length, truncation, packing, weights and the validation split act later,
on the cached samples, so changing them tokenizes nothing; nor is `data.workers` in the key: any
number of worker processes writes the same bytes (sft_encode.py). The entry holds:

    .bin/.idx    token ids, one sequence per conversation (a Megatron indexed dataset)
    .mask.bin    uint8 per token, 1 where the token is trained (the unshifted label mask)
    .first.npy   per sample, the first trained position >= 1 (the first one a label can reach)
    .json        counts for the log; written last, so its presence means the entry is whole
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from mtrain.checkpoint.atomic import atomic_paths
from mtrain.config.data import DataConfig
from mtrain.config.sft_data import SFTDataConfig
from mtrain.data import formats, sources
from mtrain.data.corpus import Tokenization, _content_hash, ready_cache_root
from mtrain.data.indexed import IndexedTokens, token_dtype, write_index
from mtrain.data.masking import ChatEncoder
from mtrain.data.progress import Ticker
from mtrain.data.sft_encode import Batch, Encoding, Piece
from mtrain.data.templates import resolve_template
from mtrain.errors import ConfigError, DataError

log = logging.getLogger("mtrain.data")

CACHE_VERSION = 1  # bump when the files written for the same inputs change


class ChatTokenizer:
    """The tokenizer, template and encoder of one SFT data config, loaded once; with
    `data.workers > 1`, also the worker processes (started on the first cache miss, stopped
    when the `with` block ends)."""

    def __init__(self, cfg: SFTDataConfig, tokenizer_dir: str):
        from transformers import AutoTokenizer

        # The PT pipeline's view of the same settings: one cache root, one tokenizer identity.
        self.pt_cfg = DataConfig(path=cfg.paths(), cache_dir=cfg.cache_dir, append_eod=False)
        self.identity = Tokenization(tokenizer_dir, self.pt_cfg).identity  # refuses a bad dir
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.template = resolve_template(cfg.template, self.tokenizer, cfg.system, cfg.thinking)
        self.encoder = ChatEncoder(self.tokenizer, self.template, cfg.train_on)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        if self.pad_id is None:
            raise ConfigError(f"tokenizer={tokenizer_dir} has neither a pad nor an eos token")
        self.dtype = token_dtype(len(self.tokenizer))
        self.encoding = Encoding(self.encoder, self.dtype, cfg.workers)

    def __enter__(self) -> ChatTokenizer:
        return self

    def __exit__(self, *exc) -> None:
        self.encoding.close()


class TokenizedFile:
    """A cache entry, read-only: samples of token ids with their trained-token masks."""

    def __init__(self, prefix: Path):
        self.prefix = prefix
        self.meta = json.loads(Path(f"{prefix}.json").read_text())
        self.tokens = IndexedTokens(prefix)
        mask_path = Path(f"{prefix}.mask.bin")
        size = mask_path.stat().st_size
        self.mask = np.memmap(mask_path, np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self.first = np.load(f"{prefix}.first.npy")
        if size != self.tokens.num_tokens or len(self.first) != len(self.tokens):
            raise DataError(f"{prefix}.*: the cache entry is inconsistent; delete it")

    @property
    def lengths(self) -> np.ndarray:
        return self.tokens.lengths

    def __len__(self) -> int:
        return len(self.tokens)

    def sample(self, i: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, trained mask) of sample i, its first `length` tokens."""
        ids = self.tokens.get(i, 0, length)
        start = int(self.tokens.pointers[i]) // self.tokens.dtype.itemsize
        return ids, self.mask[start : start + len(ids)]

    def __getstate__(self) -> str:  # DataLoader workers re-open the files
        return str(self.prefix)

    def __setstate__(self, prefix: str) -> None:
        self.__init__(Path(prefix))


Read = Callable[
    [Path, SFTDataConfig, formats.ReadStats], Iterable[tuple[str, list[formats.Messages]]]
]


@dataclass(frozen=True)
class Kind:
    """What an entry holds: `read` gives (location, the record's conversations) per good record,
    `size` conversations each; a record whose conversations do not all tokenize is bad."""

    name: str  # in the entry's file name
    read: Read
    unit: str = "conversations"  # what a record is called in the log
    size: int = 1
    entry: type[TokenizedFile] = TokenizedFile  # opens an entry


def _conversations(path: Path, cfg: SFTDataConfig, stats: formats.ReadStats):
    for where, messages in formats.conversations(path, cfg.format, cfg.columns, stats):
        yield where, [messages]


SFT = Kind("sft", _conversations)


def tokenize_file(
    path: Path, cfg: SFTDataConfig, chat: ChatTokenizer, kind: Kind = SFT
) -> TokenizedFile:
    """The cache entry of `path`, tokenizing it on a miss."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    cfg = cfg.for_file(path)  # a data.dataset file: its dataset's layout and field names
    root = ready_cache_root(chat.pt_cfg)
    settings = {
        "version": CACHE_VERSION,
        "content": _content_hash(path, root),
        "tokenizer": chat.identity,
        "template": chat.template.identity,
        "system": cfg.system,
        "format": cfg.format,
        "columns": sorted((cfg.columns or {}).items()),
        "train_on": cfg.train_on,
        "skip_bad": cfg.skip_bad,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    prefix = root / f"{path.stem}-{kind.name}-{key}"
    fresh = not Path(f"{prefix}.json").is_file()
    if fresh:
        _write(path, prefix, cfg, chat, kind)
    entry = kind.entry(prefix)
    log.info("data: %s", describe(path, entry, fresh, kind))
    return entry


def describe(path: Path, entry: TokenizedFile, fresh: bool, kind: Kind = SFT) -> str:
    m = entry.meta
    done = f"tokenized in {m['seconds']:.2f} s" if fresh else "cached"
    line = (
        f"{path}: {m['format']}, {m['samples'] // kind.size:,} {kind.unit}, {m['tokens']:,} tokens "
        f"({m['trained'] / max(m['tokens'], 1):.0%} trained) -> {entry.prefix} ({done})"
    )
    if m["bad"]:
        line += (
            f"; skipped {m['bad']:,} malformed record(s) (data.skip_bad), first: {m['first_bad']}"
        )
    return line


def _write(path: Path, prefix: Path, cfg: SFTDataConfig, chat: ChatTokenizer, kind: Kind) -> None:
    """Tokenize `path` into the entry `prefix`, all or nothing."""
    start = time.perf_counter()
    stats = formats.ReadStats(cfg.skip_bad)
    reported = set()  # a record's conversations share its location: one bad record, counted once

    def bad(where: str, err: DataError) -> None:
        if where not in reported:
            reported.add(where)
            stats.bad_record(where, err)

    suffixes = (".bin", ".mask.bin", ".first.npy", ".idx", ".json")  # renamed in order, .json last
    lengths: list[np.ndarray] = []
    firsts: list[np.ndarray] = []
    trained = 0
    ticker = Ticker(str(path), kind.unit, lambda: sources.record_count(path))
    batches = _read_batches(path, cfg, kind, chat.encoding.batch_size, stats)
    with atomic_paths(*(f"{prefix}{s}" for s in suffixes)) as paths:
        temps = dict(zip(suffixes, paths))
        with open(temps[".bin"], "wb") as ids_out, open(temps[".mask.bin"], "wb") as mask_out:
            for batch, piece in chat.encoding.pieces(batches, kind.size, path):
                for refused, where, err in _bad_records(batch, piece, kind.size):
                    (bad if refused else stats.bad_record)(where, err)
                ids_out.write(piece.ids.tobytes())
                mask_out.write(piece.mask.tobytes())
                lengths.append(piece.lengths)
                firsts.append(piece.firsts)
                trained += piece.trained
                ticker.add(batch.records + len(batch.errors), len(piece.ids))
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        if not len(lengths):
            raise DataError(
                f"{path}: no usable {kind.unit}"
                + (
                    f" (all {stats.bad} records malformed; first: {stats.first_bad})"
                    if stats.bad
                    else ""
                )
            )
        write_index(temps[".idx"], lengths, chat.dtype)
        with open(temps[".first.npy"], "wb") as f:
            np.save(f, np.concatenate(firsts))
        meta = {
            "source": str(path), "format": stats.format, "samples": len(lengths),
            "tokens": int(lengths.sum()), "trained": trained, "bad": stats.bad,
            "first_bad": stats.first_bad, "seconds": time.perf_counter() - start,
        }  # fmt: skip
        temps[".json"].write_text(json.dumps(meta))


def _bad_records(batch: Batch, piece: Piece, size: int) -> list[tuple[bool, str, DataError]]:
    """(refused by the tokenizer, where, why) of the batch's bad records, in file order, however
    far reading ran ahead of tokenizing."""
    if not (batch.errors or piece.refused):
        return []
    record = {w: n for n, w in enumerate(batch.where[::size])}  # a location -> its record index
    refused = [(record[w], True, w, err) for w, err in piece.refused]
    unread = [(n, False, w, err) for n, w, err in batch.errors]  # before record n of the batch
    return [e[1:] for e in sorted(unread + refused, key=lambda e: e[:2])]


class _Held:
    """Read errors held back until their batch is written, each with the number of good records
    of the batch before it (`ReadStats`' interface); the format read from the first usable record
    goes on to `stats`."""

    def __init__(self, stats: formats.ReadStats):
        self.stats, self.errors, self.position = stats, [], 0

    @property
    def format(self) -> str | None:
        return self.stats.format

    @format.setter
    def format(self, value: str | None) -> None:
        self.stats.format = value

    def bad_record(self, where: str, err: DataError) -> None:
        self.errors.append((self.position, where, err))

    def take(self) -> list[tuple[int, str, DataError]]:
        errors, self.errors, self.position = self.errors, [], 0
        return errors


def _read_batches(
    path: Path, cfg: SFTDataConfig, kind: Kind, size: int, stats: formats.ReadStats
) -> Iterator[Batch]:
    """`path`'s records in batches of `size`, each with the read errors met since the last."""
    held = _Held(stats)
    batch: list[tuple[str, list[formats.Messages]]] = []
    for item in chain(kind.read(path, cfg, held), [None]):
        if item is not None:
            batch.append(item)
            held.position = len(batch)
        if len(batch) == size or (item is None and (batch or held.errors)):
            conversations = [c for _, group in batch for c in group]
            where = [w for w, group in batch for _ in group]
            yield Batch(conversations, where, len(batch), held.take())
            batch = []
