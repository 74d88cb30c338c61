"""Raw corpus -> tokenized indexed dataset, once: the content-addressed cache behind PT data.

An entry is `<cache>/<stem>-<key>.bin/.idx`, where the key hashes the file's bytes, the tokenizer
(its vocabulary files and class), the format and the settings that change the tokens (text_key,
append_eod). A second run with the same inputs finds the entry and tokenizes nothing. Entries are
written under temporary names and renamed into place, `.idx` last, so an interrupted run never
leaves an entry that a later run would trust.

With `workers > 1` the chunks of a file are tokenized by a process pool and written back in
document order, so the output is byte-identical to the single-process one.
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

from mtrain.checkpoint.atomic import atomic_paths, atomic_write
from mtrain.config.data import DataConfig
from mtrain.data import pool, sources
from mtrain.data.indexed import IndexedTokens, is_prepared, token_dtype, write_index
from mtrain.data.progress import Ticker
from mtrain.errors import ConfigError, DataError

log = logging.getLogger("mtrain.data")

CACHE_VERSION = 1  # bump when the bytes written for the same inputs change
TOKENIZER_FILES = (
    "tokenizer*", "vocab*", "merges*", "special_tokens_map.json", "added_tokens.json",
    "*.tiktoken", "*.model",
)  # fmt: skip


@dataclass
class Prepared:
    """One input, ready: where its dataset is and what it holds."""

    source: str
    prefix: Path
    documents: int
    tokens: int
    seconds: float
    cached: bool  # True when nothing was tokenized (cache hit or a prepared prefix)

    def __str__(self) -> str:
        done = "cached"
        if not self.cached:
            rate = self.tokens / max(self.seconds, 1e-9)
            done = f"tokenized in {self.seconds:.2f} s, {rate:,.0f} tokens/s"
        return (
            f"{self.source}: {self.documents:,} documents, {self.tokens:,} tokens -> "
            f"{self.prefix} ({done})"
        )


def prepare_corpus(cfg: DataConfig, tokenizer_dir: str) -> list[Path]:
    """The indexed-dataset prefix of every `cfg.path`, tokenizing the inputs not cached yet."""
    return [p.prefix for p in prepare_inputs(cfg, tokenizer_dir)]


def prepare_inputs(cfg: DataConfig, tokenizer_dir: str) -> list[Prepared]:
    cfg.validate()
    kinds = [_classify(Path(p)) for p in cfg.paths()]  # refuse a bad path before any work
    done = []
    with Tokenization(tokenizer_dir, cfg) as tokenization:
        for path, kind in zip(cfg.paths(), kinds):
            if kind == "prepared":
                data = IndexedTokens(_strip_suffix(Path(path)))
                item = Prepared(path, data.prefix, len(data), data.num_tokens, 0.0, True)
            else:
                item = _prepare_file(Path(path), kind, cfg, tokenization)
            log.info("data: %s", item)
            done.append(item)
    return done


def _strip_suffix(path: Path) -> Path:
    return path.with_suffix("") if path.suffix in (".bin", ".idx") else path


def _classify(path: Path) -> str:
    """'prepared' for an indexed-dataset prefix, else the raw format; refuses anything else."""
    if path.suffix in (".bin", ".idx"):
        prefix = path.with_suffix("")
        if not is_prepared(prefix):
            raise DataError(f"{path}: a prepared dataset needs both {prefix}.bin and {prefix}.idx")
        return "prepared"
    if is_prepared(path):
        return "prepared"
    if not path.exists():
        raise DataError(f"{path}: no such file, and no prepared {path}.bin/.idx")
    fmt = sources.format_of(path)
    if path.is_dir() or fmt is None:
        raise DataError(
            f"{path}: unknown input; expected a {', '.join(sources.FORMATS)} file, or the "
            "prefix of a prepared .bin/.idx pair"
        )
    return fmt


class Tokenization:
    """The tokenizer and, with `workers > 1`, the process pool, both started only on a cache miss.

    The cache key needs only the tokenizer's identity, read from its files, so a run whose
    inputs are all cached never imports transformers. Fast tokenizers are encoded with their
    `tokenizers` backend (what `tokenizer(texts)` runs, without building a BatchEncoding); the
    workers receive that backend, not transformers.
    """

    def __init__(self, tokenizer_dir: str, cfg: DataConfig):
        self.root, self.workers, self.append_eod = Path(tokenizer_dir), cfg.workers, cfg.append_eod
        self._identity: str | None = None
        self._loaded: tuple | None = None
        self._pool = None

    def __enter__(self) -> Tokenization:
        return self

    def __exit__(self, *exc) -> None:
        pool.stop(self._pool)

    @property
    def identity(self) -> str:
        """sha256 of the tokenizer's files and its declared class."""
        if self._identity is None:
            if not self.root.is_dir():
                raise ConfigError(f"tokenizer={self.root} is not a directory with an HF tokenizer")
            files = {f for pattern in TOKENIZER_FILES for f in self.root.glob(pattern)}
            files = sorted(f for f in files if f.is_file())
            if not files:
                raise ConfigError(f"tokenizer={self.root} has no tokenizer files")
            config = self.root / "tokenizer_config.json"
            declared = (
                json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
            )
            digest = hashlib.sha256(str(declared).encode())
            for f in files:
                digest.update(f"\0{f.name}\0{_file_digest(f)}".encode())
            self._identity = digest.hexdigest()
        return self._identity

    def _load(self) -> tuple:
        """(encode, eod or None, token dtype)."""
        if self._loaded is None:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(self.root))
            if self.append_eod and hf.eos_token_id is None:
                raise ConfigError(
                    f"data.append_eod=true but tokenizer={self.root} has no eos token"
                )
            backend = getattr(hf, "backend_tokenizer", None)
            encode = _BackendEncoder(backend) if backend is not None else _HFEncoder(hf)
            eod = hf.eos_token_id if self.append_eod else None
            self._loaded = (encode, eod, token_dtype(len(hf)))
        return self._loaded

    @property
    def dtype(self) -> np.dtype:
        return self._load()[2]

    def encoded(self, chunks: Iterable[sources.Chunk]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(token ids, document lengths) per chunk, in chunk order."""
        encode, eod, dtype = self._load()
        if self.workers == 1:
            return (encode_chunk(c, encode, eod, dtype) for c in chunks)
        if self._pool is None:  # workers import numpy and tokenizers (plus this package)
            self._pool = pool.start(self.workers, _worker_init, (encode, eod, dtype))
        # A bounded window of chunks in flight keeps memory flat for texts shipped by this process.
        return (r for _, r in pool.in_order(self._pool, _worker_chunk, chunks, 2 * self.workers))


def _prepare_file(path: Path, fmt: str, cfg: DataConfig, tokenization: Tokenization) -> Prepared:
    start = time.perf_counter()
    root = ready_cache_root(cfg)
    settings = {
        "version": CACHE_VERSION,
        "content": _content_hash(path, root),
        "format": fmt,
        "tokenizer": tokenization.identity,
        "text_key": cfg.text_key if fmt != "txt" else None,
        "append_eod": cfg.append_eod,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    prefix = root / f"{path.stem}-{key}"
    if is_prepared(prefix):
        data = IndexedTokens(prefix)
        return Prepared(str(path), prefix, len(data), data.num_tokens, 0.0, True)
    documents, tokens = _write(
        path, sources.chunks(path, fmt, cfg.text_key, cfg.workers), tokenization, prefix
    )
    return Prepared(str(path), prefix, documents, tokens, time.perf_counter() - start, False)


def _write(
    path: Path, chunks: Iterable[sources.Chunk], tokenization: Tokenization, prefix: Path
) -> tuple[int, int]:
    """Tokenize `chunks` into `prefix`.bin/.idx, all or nothing; (documents, tokens)."""
    lengths = []
    ticker = Ticker(str(path), "documents", lambda: sources.record_count(path))
    # .idx last: the entry becomes visible only once both files are complete.
    with atomic_paths(f"{prefix}.bin", f"{prefix}.idx") as (bin_tmp, idx_tmp):
        with open(bin_tmp, "wb") as out:
            for ids, lens in tokenization.encoded(chunks):
                out.write(ids.tobytes())
                lengths.append(lens)
                ticker.add(len(lens), len(ids))
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
        if not len(lengths):
            raise DataError(f"{path}: no documents (the file is empty or every text is empty)")
        write_index(idx_tmp, lengths, tokenization.dtype)
    return len(lengths), int(lengths.sum(dtype=np.int64))


Encoder = Callable[[list[str]], list[list[int]]]  # texts -> token ids, special tokens included


class _BackendEncoder:
    def __init__(self, backend):
        self.backend = backend

    def __call__(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips computing character offsets, which PT data never needs.
        batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in batch(texts, add_special_tokens=True)]


class _HFEncoder:
    def __init__(self, hf):
        self.hf = hf

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return self.hf(texts, add_special_tokens=True)["input_ids"]


def encode_chunk(
    chunk: sources.Chunk, encode: Encoder, eod: int | None, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids with an EOD after each document, tokens per document) of one chunk."""
    ids = encode(sources.read_texts(chunk))
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    if eod is not None:
        # Insert one EOD after each document: shift every document by the EODs before it.
        ends = np.cumsum(lengths + 1) - 1
        with_eod = np.full(len(flat) + len(ids), eod, dtype=np.int64)
        keep = np.ones(len(with_eod), dtype=bool)
        keep[ends] = False
        with_eod[keep] = flat
        flat, lengths = with_eod, lengths + 1
    if len(flat) and (flat.max() > np.iinfo(dtype).max or flat.min() < 0):
        raise DataError(f"{chunk.path}: token id {flat.max()} does not fit the dataset's {dtype}")
    return flat.astype(dtype), lengths.astype(np.int32)


# Pool workers keep their encoder here (set once by the initializer, never in the main process).
_WORKER: dict = {}


def _worker_init(encode, eod, dtype) -> None:
    pool.single_threaded()
    _WORKER.update(encode=encode, eod=eod, dtype=dtype)


def _worker_chunk(chunk: sources.Chunk) -> tuple[np.ndarray, np.ndarray]:
    return encode_chunk(chunk, _WORKER["encode"], _WORKER["eod"], _WORKER["dtype"])


def _content_hash(path: Path, root: Path) -> str:
    """sha256 of the file's bytes, remembered per (path, size, mtime, ctime, inode) so an
    unchanged big corpus is not re-read on every run."""
    st = path.stat()
    stamp = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
    memo = root / "hashes" / hashlib.sha256(stamp.encode()).hexdigest()[:32]
    if memo.is_file():
        return memo.read_text().strip()
    digest = _file_digest(path)
    memo.parent.mkdir(exist_ok=True)
    atomic_write(memo, digest)
    return digest


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def ready_cache_root(cfg) -> Path:
    """The cache directory of a data config (`data.cache_dir`), created if needed."""
    root = cfg.cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"data.cache_dir={root} cannot be created ({err.strerror})") from None
    return root
