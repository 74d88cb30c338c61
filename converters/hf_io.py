"""Reading and writing HF safetensors checkpoints tensor by tensor, never whole.

The reader slices tensors straight out of the files (`safe_open(...).get_slice`), so a TP shard
costs only its own bytes. Handles are opened per `session()`: closing them unmaps the files, which
keeps resident memory at the size of what is being built, not of everything touched so far.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mtrain.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # the HF default of "5GB"


class HFReader:
    """Lazy access to the tensors of an HF model directory (single file or sharded)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self.weight_map = self._weight_map()
        self._handles: dict[str, object] | None = None

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise CheckpointError(f"{index} names {missing[0]}, which is not in {self.dir}")
            return weight_map
        single = self.dir / SINGLE_FILE
        if single.is_file():
            with safe_open(single, framework="pt") as f:
                return {name: SINGLE_FILE for name in f.keys()}
        raise CheckpointError(
            f"{self.dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors "
            "checkpoints are supported (save with `save_pretrained(..., safe_serialization=True)`)"
        )

    @contextmanager
    def session(self) -> Iterator[HFReader]:
        """Keep file handles open for a batch of reads; they are closed (unmapped) on exit."""
        self._handles = {}
        try:
            yield self
        finally:
            self._handles = None

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        file = self.weight_map[name]
        if self._handles is None:
            raise RuntimeError("HFReader reads must happen inside `with reader.session():`")
        if file not in self._handles:
            self._handles[file] = safe_open(self.dir / file, framework="pt")
        return self._handles[file].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def __call__(
        self, name: str, rows: slice | None = None, cols: slice | None = None
    ) -> torch.Tensor:
        part = self._slice(name)
        if rows is None and cols is None:
            return part[:]
        if cols is None:
            return part[rows]
        return part[rows if rows is not None else slice(None), cols]


class HFShardedWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes`, then the index.

    A single shard is written as `model.safetensors` with no index, as `save_pretrained` does.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0
        self.largest_shard_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        temp = f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(self.out_dir / temp), metadata={"format": "pt"})
        self._shards.append((temp, list(self._pending)))
        self.largest_shard_bytes = max(self.largest_shard_bytes, self._pending_bytes)
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush, give the shards their final names, write the index; returns the file names."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            (self.out_dir / self._shards[0][0]).rename(self.out_dir / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map: dict[str, str] = {}
        names = []
        for i, (temp, tensors) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.out_dir / temp).rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(tensors, final))
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names
