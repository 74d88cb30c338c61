"""Megatron's indexed dataset format (`<prefix>.bin` + `<prefix>.idx`), read and written with numpy.

`.bin` is every document's token ids back to back, in one integer dtype. `.idx` is:

    b"MMIDIDX\\x00\\x00"  u64 version=1  u8 dtype code
    u64 S (sequences)  u64 D (entries of document_indices = documents + 1)
    int32[S] sequence lengths (tokens)  int64[S] sequence byte offsets into .bin
    int64[D] document_indices: 0, 1, ..., S (one sequence per document here)

Megatron-LM, MindSpeed-LLM and `megatron.core.datasets.indexed_dataset.IndexedDataset` read it;
keeping our own ~80 lines avoids depending on megatron internals for data.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from mtrain.errors import DataError

HEADER = b"MMIDIDX\x00\x00"
# Megatron's DType codes.
DTYPE_CODES = {
    np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
    np.float64: 6, np.float32: 7, np.uint16: 8,
}  # fmt: skip
CODE_DTYPES = {code: np.dtype(t) for t, code in DTYPE_CODES.items()}
_PREAMBLE = struct.Struct("<9sQBQQ")


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype Megatron's preprocessing picks: uint16 while ids fit, int32 beyond."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def write_index(idx_path: Path, lengths: np.ndarray, dtype: np.dtype) -> None:
    """The `.idx` for a `.bin` holding documents of `lengths` tokens, one sequence each."""
    lengths = np.asarray(lengths, dtype=np.int32)
    count = len(lengths)
    pointers = np.zeros(count, dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    with open(idx_path, "wb") as f:
        f.write(_PREAMBLE.pack(HEADER, 1, DTYPE_CODES[np.dtype(dtype).type], count, count + 1))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(count + 1, dtype=np.int64).tobytes())


def is_prepared(prefix: Path) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


class IndexedTokens:
    """Read-only view of a prepared dataset: one token array per sequence, memory-mapped."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        with open(idx_path, "rb") as f:
            head = f.read(_PREAMBLE.size)
        if len(head) < _PREAMBLE.size or head[:9] != HEADER:
            raise DataError(f"{idx_path}: not a Megatron indexed dataset (bad header)")
        _, version, code, count, doc_count = _PREAMBLE.unpack(head)
        if version != 1 or code not in CODE_DTYPES:
            raise DataError(f"{idx_path}: unsupported version {version} or dtype code {code}")
        self.dtype = CODE_DTYPES[code]
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        need = _PREAMBLE.size + count * 12 + doc_count * 8
        if len(idx) < need:
            raise DataError(f"{idx_path}: truncated ({len(idx)} bytes, header promises {need})")
        start = _PREAMBLE.size
        self.lengths = idx[start : start + 4 * count].view(np.int32)
        self.pointers = idx[start + 4 * count : start + 12 * count].view(np.int64)
        self.num_tokens = int(self.lengths.sum(dtype=np.int64))
        size = bin_path.stat().st_size
        if size != self.num_tokens * self.dtype.itemsize:
            raise DataError(
                f"{bin_path}: {size} bytes but {idx_path} describes "
                f"{self.num_tokens * self.dtype.itemsize}; the pair is incomplete or mismatched"
            )
        self.tokens = (
            np.memmap(bin_path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence `i` (a view into the mapped file)."""
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        stop = start + (int(self.lengths[i]) - offset if length is None else length)
        return self.tokens[start:stop]

    # Re-open the files in a DataLoader worker instead of pickling the mapped arrays.
    def __getstate__(self) -> str:
        return str(self.prefix)

    def __setstate__(self, prefix: str) -> None:
        self.__init__(prefix)
