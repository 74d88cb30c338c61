"""Raw pretraining corpora: which files are accepted, and how they are cut into chunks of documents.

A chunk is the unit of work for one tokenizer process. JSONL and plain-text files are cut into
byte ranges that the workers read and parse themselves, so a big corpus is parsed in parallel;
a JSON list has to be parsed whole and Parquet is decoded column-wise in C++, so for those the
main process reads the texts and ships them in batches. Chunks come in document order.

Documents whose text is empty are skipped in every format: they would only add an EOD.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mtrain.errors import DataError

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt"}
BATCH_DOCS = 4096  # documents per chunk shipped from the main process (json, parquet)
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 1 << 20, 64 << 20  # byte ranges of jsonl/txt files


@dataclass(frozen=True)
class Chunk:
    """Either bytes `start:stop` of a jsonl/txt file, or texts read by the main process."""

    path: str
    fmt: str
    text_key: str
    start: int = 0
    stop: int = 0
    texts: list[str] | None = None


def format_of(path: Path) -> str | None:
    return FORMATS.get(path.suffix.lower())


def chunks(path: Path, fmt: str, text_key: str, workers: int) -> Iterator[Chunk]:
    if fmt in ("jsonl", "txt"):
        size = path.stat().st_size
        # Several chunks per worker balance the tail; the bounds cap overhead and memory.
        step = min(max(size // (workers * 8), MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
        for start in range(0, size, step):
            yield Chunk(str(path), fmt, text_key, start, min(start + step, size))
    elif fmt == "json":
        texts = json_texts(path, text_key)
        for i in range(0, len(texts), BATCH_DOCS):
            yield Chunk(str(path), fmt, text_key, texts=texts[i : i + BATCH_DOCS])
    else:
        yield from parquet_chunks(path, text_key)


def record_count(path: Path) -> int | None:
    """How many records `path` holds, where that is cheap to know: a Parquet file's rows, a
    JSONL or text file's lines (one pass, no parsing; blank lines included); None for a JSON
    list, which would have to be parsed."""
    fmt = format_of(path)
    if fmt == "parquet":
        return open_parquet(path).metadata.num_rows
    if fmt not in ("jsonl", "txt"):
        return None
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def read_texts(chunk: Chunk) -> list[str]:
    """The non-empty documents of `chunk`, in file order."""
    if chunk.texts is not None:
        return chunk.texts
    lines, first_byte = _lines(chunk)
    texts = []
    for n, line in enumerate(lines):
        try:
            text = _line_text(line, chunk)
        except DataError as err:
            # Only now pay for counting the lines before this chunk.
            lineno = _count_newlines(chunk.path, first_byte) + n + 1
            raise DataError(f"{chunk.path}:{lineno}: {err}") from None
        if text:
            texts.append(text)
    return texts


def _lines(chunk: Chunk) -> tuple[list[bytes], int]:
    """Lines that start inside `start:stop` (the one straddling `stop` included), and the offset
    of the first of them."""
    with open(chunk.path, "rb") as f:
        begin = chunk.start
        if begin > 0:
            f.seek(begin - 1)
            begin += len(f.readline()) - 1  # the line in progress belongs to the previous chunk
        if begin >= chunk.stop:
            return [], begin
        data = f.read(chunk.stop - begin)
        if not data.endswith(b"\n"):
            data += f.readline()
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines, begin


def _line_text(line: bytes, chunk: Chunk) -> str:
    if chunk.fmt == "txt":
        try:
            return line.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if not line.strip():
        return ""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
    return _record_text(record, chunk.text_key)


def _record_text(record: object, key: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object with field {key!r}, got {type(record).__name__}")
    if key not in record:
        fields = ", ".join(map(repr, list(record)[:8])) or "none"
        raise DataError(f"no field {key!r} (fields: {fields}); set data.text_key")
    text = record[key]
    if not isinstance(text, str):
        raise DataError(f"field {key!r} is {type(text).__name__}, not a string")
    return text


def _count_newlines(path: str, stop: int) -> int:
    count = 0
    with open(path, "rb") as f:
        while stop > 0:
            block = f.read(min(stop, 1 << 24))
            if not block:
                break
            count += block.count(b"\n")
            stop -= len(block)
    return count


def json_texts(path: Path, text_key: str) -> list[str]:
    """The documents of a JSON file holding a list of records."""
    try:
        with open(path, "rb") as f:
            records = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
        ) from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if not isinstance(records, list):
        raise DataError(
            f"{path}: expected a JSON list of records, got {type(records).__name__}; "
            "for one record per line use a .jsonl file"
        )
    texts = []
    for n, record in enumerate(records, 1):
        try:
            text = _record_text(record, text_key)
        except DataError as err:
            raise DataError(f"{path}: record {n}: {err}") from None
        if text:
            texts.append(text)
    return texts


def open_parquet(path: Path):
    """A pyarrow ParquetFile, or a DataError naming the file."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None


def parquet_chunks(path: Path, text_key: str) -> Iterator[Chunk]:
    table = open_parquet(path)
    names = table.schema_arrow.names
    if text_key not in names:
        raise DataError(
            f"{path}: no column {text_key!r} (columns: {', '.join(names)}); set data.text_key"
        )
    row = 0
    for batch in table.iter_batches(batch_size=BATCH_DOCS, columns=[text_key]):
        column = batch.column(0)
        if column.null_count:
            first = column.is_null().to_pylist().index(True)
            raise DataError(f"{path}: row {row + first + 1}: column {text_key!r} is null")
        texts = column.to_pylist()
        if texts and not isinstance(texts[0], str):
            raise DataError(f"{path}: column {text_key!r} holds {column.type}, not strings")
        row += len(texts)
        yield Chunk(str(path), "parquet", text_key, texts=[t for t in texts if t])
