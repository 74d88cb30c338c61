"""Reading and writing HF safetensors checkpoints tensor by tensor, never whole.

Both sides do their own I/O on the (simple, stable) safetensors layout: an 8-byte little-endian
header length, a JSON header of {name: dtype, shape, data_offsets}, then the raw bytes.

- Reading goes straight into the caller's tensor (a parameter, when a run starts from HF
  weights). Rows are one `pread` of exactly their bytes. A column slice maps `_MAP_BLOCK` bytes
  of whole rows at a time, just for one strided `copy_`, and unmaps them (reading the rows
  whole instead would copy twice the bytes at TP2). Nothing stays mapped, so resident memory
  is what is being built, not every page touched so far.
- Writing plans every shard's header up front from the tensors' names, dtypes and shapes, then
  streams each tensor to disk as soon as it exists; nothing waits in memory for a shard to fill.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from mtrain.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # the HF default of "5GB"
_MAX_HEADER = 100 << 20  # safetensors' own limit
_MAP_BLOCK = 64 << 20  # bytes of whole rows mapped at a time for a column slice

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Name -> where and what, from a safetensors file's header; refuses a malformed file."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(f.read(length))
            size = os.fstat(f.fileno()).st_size
        header.pop("__metadata__", None)
        base = 8 + length
        tensors = {
            name: TensorInfo(
                path.name, DTYPES[h["dtype"]], tuple(h["shape"]), base + h["data_offsets"][0]
            )
            for name, h in header.items()
        }
        end = base + max((h["data_offsets"][1] for h in header.values()), default=0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err!r})") from None
    if size < end:
        raise CheckpointError(
            f"{path}: truncated ({size} bytes, its header describes {end}); copy or download it "
            "again"
        )
    return tensors


def _pread_into(fd: int, tensor: torch.Tensor, offset: int, path: Path) -> None:
    view = memoryview(tensor.detach().view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(
                f"{path}: unexpected end of file at byte {offset + done}; the file is truncated "
                "(copy or download it again)"
            )
        done += n


class HFReader:
    """Slice-level access to the tensors of an HF model directory (single file or sharded)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._files():
            self.tensors.update(read_header(self.dir / file))
        self._fds: dict[str, int] | None = None

    @property
    def weight_map(self) -> dict[str, str]:
        return {name: info.file for name, info in self.tensors.items()}

    def _files(self) -> list[str]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err!r})") from None
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise CheckpointError(
                    f"{index}: weight_map must map tensor names to file names (a JSON object)"
                )
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise CheckpointError(f"{index} names {missing[0]}, which is not in {self.dir}")
            return files
        if (self.dir / SINGLE_FILE).is_file():
            return [SINGLE_FILE]
        raise CheckpointError(
            f"{self.dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors "
            "checkpoints are supported (save with `save_pretrained(..., safe_serialization=True)`)"
        )

    def unstack(self, name: str, parts: list[list[str]]) -> None:
        """Present the 3-D tensor `name` [n, rows, cols] as 2-D tensors: the rows of slab i split
        evenly into the tensors `parts[i]` (slices of the same bytes; nothing is read)."""
        info = self.tensors.pop(name)
        n, rows, cols = info.shape
        k = len(parts[0])
        if len(parts) != n or rows % k:
            raise CheckpointError(
                f"{self.dir}: tensor {name} has shape {list(info.shape)}, not {len(parts)} "
                f"stacked experts of {k} equal parts"
            )
        row_bytes = cols * info.dtype.itemsize
        for i, names in enumerate(parts):
            for j, part in enumerate(names):
                offset = info.offset + (i * rows + j * rows // k) * row_bytes
                self.tensors[part] = TensorInfo(info.file, info.dtype, (rows // k, cols), offset)

    @contextmanager
    def session(self) -> Iterator[HFReader]:
        """Keep file descriptors open for a batch of reads."""
        self._fds = {}
        try:
            yield self
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds = None

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        return self.tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def _fd(self, file: str) -> int:
        if self._fds is None:
            raise RuntimeError("HFReader reads must happen inside `with reader.session():`")
        if file not in self._fds:
            self._fds[file] = os.open(self.dir / file, os.O_RDONLY)
        return self._fds[file]

    def __call__(
        self, name: str, rows: slice | None = None, cols: slice | None = None
    ) -> torch.Tensor:
        """Rows `rows` (dim 0) and columns `cols` (dim 1) of a tensor, in fresh memory."""
        info = self.info(name)
        out = torch.empty(_slice_shape(info.shape, rows, cols), dtype=info.dtype)
        self.read_into(name, out, rows, cols)
        return out

    def read_into(
        self, name: str, out: torch.Tensor, rows: slice | None = None, cols: slice | None = None
    ) -> None:
        """Rows `rows` and columns `cols` of a tensor into `out`, cast as `copy_` casts. Rows
        are read straight into `out` when it is contiguous CPU memory of the tensor's dtype
        (else through a buffer)."""
        info = self.info(name)
        shape = _slice_shape(info.shape, rows, cols)
        if tuple(out.shape) != shape:
            raise ValueError(f"{name}[{rows}, {cols}] has shape {shape}, not {tuple(out.shape)}")
        if not out.numel():
            return
        r0 = (rows or slice(None)).indices(info.shape[0])[0] if shape else 0
        row_bytes = math.prod(info.shape[1:]) * info.dtype.itemsize
        start = info.offset + r0 * row_bytes
        if cols is not None and shape[1] != info.shape[1]:
            step = max(1, _MAP_BLOCK // row_bytes)
            for i in range(0, shape[0], step):
                n = min(step, shape[0] - i)
                self._copy_columns(info, out[i : i + n], start + i * row_bytes, cols)
            return
        direct = out.device.type == "cpu" and out.dtype == info.dtype and out.is_contiguous()
        target = out if direct else torch.empty(shape, dtype=info.dtype)
        _pread_into(self._fd(info.file), target, start, self.dir / info.file)
        if not direct:
            out.copy_(target)

    def _copy_columns(self, info: TensorInfo, out: torch.Tensor, start: int, cols: slice) -> None:
        """`out` = columns `cols` of the `len(out)` whole rows whose bytes begin at `start`."""
        length = len(out) * math.prod(info.shape[1:]) * info.dtype.itemsize
        base = start - start % mmap.ALLOCATIONGRANULARITY
        # ACCESS_COPY: private and writable, as torch wants its buffers; nothing writes to it.
        fd = self._fd(info.file)
        with mmap.mmap(fd, start + length - base, access=mmap.ACCESS_COPY, offset=base) as mapped:
            raw = torch.frombuffer(mapped, dtype=torch.uint8, count=length, offset=start - base)
            try:
                out.copy_(raw.view(info.dtype).view(-1, *info.shape[1:])[:, cols])
            finally:
                del raw  # releases the buffer, so that the mapping can close


def _slice_shape(shape: tuple[int, ...], rows: slice | None, cols: slice | None) -> tuple:
    if not shape:
        return ()
    dims = list(shape)
    for axis, part in ((0, rows), (1, cols)):
        if part is not None:
            dims[axis] = len(range(*part.indices(shape[axis])))
    return tuple(dims)


class _StreamedFile:
    """One safetensors file whose header is written first and whose tensors follow in order."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in plan:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.path = path
        self.plan = plan
        self.file: BinaryIO = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0
        self.nbytes = offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, dtype, shape = self.plan[self.next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (expected, dtype, shape):
            raise RuntimeError(
                f"{self.path}: got {name} {tensor.dtype}{list(tensor.shape)}, "
                f"planned {expected} {dtype}{list(shape)}"
            )
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(data))
        self.next += 1
        if self.next == len(self.plan):
            self.file.close()


class HFShardedWriter:
    """Streams planned tensors into shards of at most `max_shard_bytes` (+ index when > 1).

    The plan (name, dtype, shape, in the order `add` will be called) fixes the shards and their
    names up front: `model.safetensors` alone, or `model-0000i-of-0000N.safetensors` + index, as
    `save_pretrained` names them. A tensor larger than the limit gets a shard of its own.
    """

    def __init__(
        self,
        out_dir: Path,
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ):
        groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for item in plan:
            nbytes = math.prod(item[2]) * item[1].itemsize
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += nbytes
        count = len(groups)
        self.names = (
            [SINGLE_FILE]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self.out_dir = out_dir
        self._groups = groups
        self._current: _StreamedFile | None = None
        self._shard = -1
        self.total_bytes = sum(math.prod(s) * d.itemsize for _, d, s in plan)
        self.largest_bytes = max(
            (sum(math.prod(s) * d.itemsize for _, d, s in g) for g in groups), default=0
        )

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._current is None or self._current.next == len(self._current.plan):
            self._shard += 1
            self._current = _StreamedFile(
                self.out_dir / self.names[self._shard], self._groups[self._shard]
            )
        self._current.write(name, tensor)

    def finish(self) -> list[str]:
        """Check every planned tensor was written; write the index; return the file names."""
        written = (
            self._shard == len(self._groups) - 1
            and self._current is not None
            and (self._current.next == len(self._current.plan))
        )
        if not written:
            raise RuntimeError("HFShardedWriter.finish() before every planned tensor was added")
        if len(self.names) > 1:
            weight_map = {
                name: file for file, group in zip(self.names, self._groups) for name, _, _ in group
            }
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / INDEX_FILE).write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n"
            )
        return self.names
