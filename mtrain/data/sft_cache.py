"""SFT files -> tokenized samples with loss masks, once: the content-addressed cache of SFT data.

An entry is `<cache>/<stem>-<kind>-<key>.*`. Its kind is `sft` (a sample per conversation) or
`pairs` (DPO, pairs.py: samples 2i and 2i + 1 are pair i's chosen and rejected conversations),
so an entry is never read as the other kind. The key hashes the file's bytes, the tokenizer
(its files), the chat template (its source, or the built-in's name and version, with
data.thinking and data.system) and every setting that changes the samples: format, columns,
train_on, skip_bad. seq_length, truncation, packing, weights and the validation split act later,
on the cached samples, so changing them tokenizes nothing. The entry holds:

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from mtrain.checkpoint.atomic import atomic_paths
from mtrain.config.data import DataConfig
from mtrain.config.sft_data import SFTDataConfig
from mtrain.data import formats
from mtrain.data.corpus import Tokenization, _content_hash, ready_cache_root
from mtrain.data.indexed import IndexedTokens, token_dtype, write_index
from mtrain.data.masking import ChatEncoder, Encoded
from mtrain.data.templates import resolve_template
from mtrain.errors import ConfigError, DataError

log = logging.getLogger("mtrain.data")

CACHE_VERSION = 1  # bump when the files written for the same inputs change
BATCH = 4096  # conversations rendered and tokenized together (the tokenizer's threads share them)


class ChatTokenizer:
    """The tokenizer, template and encoder of one SFT data config, loaded once."""

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
    lengths: list[int] = []
    firsts: list[int] = []
    trained = 0
    with atomic_paths(*(f"{prefix}{s}" for s in suffixes)) as paths:
        temps = dict(zip(suffixes, paths))
        with (
            open(temps[".bin"], "wb") as ids_out,
            open(temps[".mask.bin"], "wb") as mask_out,
            ThreadPoolExecutor(1) as renderer,
        ):
            # Batch n+1 is read and rendered (Python) while batch n is tokenized (Rust, no GIL).
            reading = kind.read(path, cfg, stats)
            pending = None  # (locations, rendering in progress) of the batch read last
            for batch in chain(_batches(reading, BATCH), [None]):
                submitted = None
                if batch is not None:
                    conversations = [c for _, group in batch for c in group]
                    submitted = (
                        [w for w, group in batch for _ in group],
                        renderer.submit(chat.encoder.render, conversations),
                    )
                if pending is not None:
                    where, rendering = pending
                    encoded = chat.encoder.tokenize(rendering.result(), where, bad)
                    groups = [encoded[i : i + kind.size] for i in range(0, len(encoded), kind.size)]
                    encoded = [e for group in groups if None not in group for e in group]
                    ids, mask = _flatten(encoded, chat.dtype, path)
                    ids_out.write(ids.tobytes())
                    mask_out.write(mask.tobytes())
                    lengths += [len(e.ids) for e in encoded]
                    firsts += [_first_trained(e) for e in encoded]
                    trained += int(mask.sum(dtype=np.int64))
                pending = submitted
        if not lengths:
            raise DataError(
                f"{path}: no usable {kind.unit}"
                + (
                    f" (all {stats.bad} records malformed; first: {stats.first_bad})"
                    if stats.bad
                    else ""
                )
            )
        write_index(temps[".idx"], np.asarray(lengths), chat.dtype)
        with open(temps[".first.npy"], "wb") as f:
            np.save(f, np.asarray(firsts, dtype=np.int32))
        meta = {
            "source": str(path), "format": stats.format, "samples": len(lengths),
            "tokens": int(sum(lengths)), "trained": trained, "bad": stats.bad,
            "first_bad": stats.first_bad, "seconds": time.perf_counter() - start,
        }  # fmt: skip
        temps[".json"].write_text(json.dumps(meta))


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _flatten(encoded: list[Encoded], dtype: np.dtype, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All samples' token ids back to back in `dtype`, and their trained-token mask."""
    sizes = [len(e.ids) for e in encoded]
    ids = np.fromiter(chain.from_iterable(e.ids for e in encoded), dtype=np.int64, count=sum(sizes))
    if len(ids) and ids.max() > np.iinfo(dtype).max:
        raise DataError(f"{path}: token id {ids.max()} does not fit the dataset's {dtype}")
    mask = np.zeros(len(ids), dtype=np.uint8)
    offset = 0
    for size, e in zip(sizes, encoded):
        for a, b in e.spans:
            mask[offset + a : offset + b] = 1
        offset += size
    return ids.astype(dtype), mask


def _first_trained(e: Encoded) -> int:
    """The first trained position a label can reach (>= 1), or len(ids) when there is none."""
    for a, b in e.spans:
        if max(a, 1) < b:
            return max(a, 1)
    return len(e.ids)
