"""megatron-core's distributed checkpoint format (`torch_dist`), read without a process group.

A torch_dist iteration directory, as megatron-core's `dist_checkpointing.save` writes it:

    metadata.json     {"sharded_backend": "torch_dist", ...}: marks the format
    common.pt         torch.save of everything not sharded: args, iteration, scheduler state
    .metadata         pickled `torch.distributed.checkpoint.metadata.Metadata`: for each key its
                      global shape, dtype and chunks (offsets, sizes), and for each chunk the file,
                      byte offset and length where it is stored
    __<rank>_<n>.distcp  the chunks; each is a torch.save of one chunk tensor

Each tensor is stored at its global (TP 1, PP 1) shape, whatever layout wrote it: the TP shards
are chunks of it (q/k/v grouped as Megatron fuses them, fc1 as [all gate rows; all up rows]), and
the decoder layers are stacked on a leading axis (key `decoder.layers.<name>`, axis 0 = global
layer). The layers' pre-norms carry their fused names (`FUSED_NORM_NAMES`). That is why a
torch_dist checkpoint can be read here as a TP1 x PP1 checkpoint, one layer at a time.

`.metadata` goes through mtrain's allowlist unpickler with the metadata dataclasses admitted, and
`common.pt` through the safe checkpoint loader, before anything else opens them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mtrain.errors import CheckpointError
from mtrain.models.families.base import FUSED_NORM_NAMES, Kind
from mtrain.models.spec import ModelSpec

MARKER = "metadata.json"
COMMON = "common.pt"
DCP_METADATA = ".metadata"
LAYERS = "decoder.layers."
_NOT_MODEL = ("optimizer.", "rng_state")  # keys of the other parts a training save holds


def is_dist_checkpoint(iter_dir: Path) -> bool:
    """An iteration directory in megatron-core's torch_dist format."""
    marker = Path(iter_dir) / MARKER
    if not marker.is_file():
        return False
    try:
        backend = json.loads(marker.read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{marker}: not megatron-core's format marker ({err})") from None
    if backend != "torch_dist":
        raise CheckpointError(
            f"{marker}: sharded_backend={backend!r}; only megatron-core's torch_dist format is read"
        )
    return True


@lru_cache(maxsize=1)
def _metadata_globals() -> dict[str, Any]:
    """The classes a torch_dist `.metadata` pickle names: plain dataclasses and enums."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata, planner

    admitted: dict[str, Any] = {
        f"torch.distributed.checkpoint.metadata.{n}": getattr(metadata, n)
        for n in (
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
            "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
        )
    }  # fmt: skip
    admitted.update(
        {
            f"torch.distributed.checkpoint.planner.{n}": getattr(planner, n)
            for n in ("WriteItem", "WriteItemType", "TensorWriteData")
        }
    )
    admitted["torch.distributed.checkpoint.filesystem._StorageInfo"] = filesystem._StorageInfo
    admitted["torch.serialization._get_layout"] = torch.serialization._get_layout
    admitted["pathlib.PosixPath"] = pathlib.PosixPath
    try:
        from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlan

        admitted["megatron.core.dist_checkpointing.strategies.torch.MCoreSavePlan"] = MCoreSavePlan
    except ImportError:
        pass
    return admitted


def read_dcp_metadata(iter_dir: Path) -> Any:
    from torch.distributed.checkpoint.metadata import Metadata

    from mtrain.checkpoint.unpickle import load_restricted_pickle

    path = Path(iter_dir) / DCP_METADATA
    if not path.is_file():
        raise CheckpointError(f"{path} not found; the torch_dist checkpoint is incomplete")
    found = load_restricted_pickle(path, _metadata_globals())
    if not isinstance(found, Metadata):
        raise CheckpointError(f"{path}: holds a {type(found).__name__}, not checkpoint metadata")
    return found


class DistReader:
    """Tensors of a torch_dist checkpoint, whole or one index of their leading axis at a time."""

    def __init__(self, iter_dir: Path):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir = Path(iter_dir)
        self.metadata = read_dcp_metadata(self.dir)
        self.tensors = {
            key: meta
            for key, meta in self.metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata)
        }

    def has_optimizer(self) -> bool:
        return any(key.startswith("optimizer.") for key in self.metadata.state_dict_metadata)

    def model_keys(self) -> list[str]:
        return [k for k in self.tensors if not k.startswith(_NOT_MODEL)]

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """Tensor `key`, or its `[index]` along axis 0, assembled from the chunks that hold it."""
        meta = self.tensors[key]
        shape = tuple(meta.size)[1:] if index is not None else tuple(meta.size)
        out = torch.empty(shape, dtype=meta.properties.dtype)
        filled = 0
        for chunk in meta.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if index is not None:
                if not offsets[0] <= index < offsets[0] + sizes[0]:
                    continue
                data = self._chunk(key, chunk)[index - offsets[0]]
                offsets, sizes = offsets[1:], sizes[1:]
            else:
                data = self._chunk(key, chunk)
            out[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = data
            filled += data.numel()
        if filled != out.numel():
            raise CheckpointError(
                f"{self.dir}: the chunks of {key} cover {filled} of its {out.numel()} elements; "
                "the checkpoint is incomplete"
            )
        return out

    def _chunk(self, key: str, chunk: Any) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.metadata.storage_data.get(MetadataIndex(key, chunk.offsets))
        if info is None:
            raise CheckpointError(f"{self.dir}/{DCP_METADATA}: no storage for a chunk of {key}")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(
                f"{self.dir}: {key} is stored with transforms {info.transform_descriptors} "
                "(compression?), which mtrain does not read"
            )
        path = self.dir / info.relative_path
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot be read ({err})") from None
        if len(data) != info.length:
            raise CheckpointError(f"{path}: truncated (a chunk of {key} ends early)")
        try:
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for damaged data
            raise CheckpointError(f"{path}: a chunk of {key} cannot be read ({err})") from None
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(chunk.sizes):
            raise CheckpointError(f"{path}: a chunk of {key} is not of its recorded shape")
        return tensor


class DistModelState(Mapping):
    """The model state of a torch_dist checkpoint under TP1 x PP1 local names, read on access
    (one layer's tensor at a time); vocabulary rows trimmed or zero-padded to the TP1 padding."""

    def __init__(self, reader: DistReader, spec: ModelSpec):
        self._reader = reader
        family = spec.family_table
        self._vocab = {e.mcore for e in (family.embedding, family.output) if e.kind is Kind.VOCAB}
        self._padded_vocab = spec.padded_vocab_size(1)
        self._names: dict[str, tuple[str, int | None]] = {}
        fused = {te: local for local, te in FUSED_NORM_NAMES}
        for key in reader.model_keys():
            if key.startswith(LAYERS):
                rest = key[len(LAYERS) :]
                for layer in range(reader.shape(key)[0]):
                    name = f"{LAYERS}{layer}.{fused.get(rest, rest)}"
                    self._names[name] = (key, layer)
            else:
                self._names[key] = (key, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def dtype_of(self, name: str) -> torch.dtype:
        return self._reader.dtype(self._names[name][0])

    def __getitem__(self, name: str) -> torch.Tensor:
        key, layer = self._names[name]
        tensor = self._reader.read(key, layer)
        if name in self._vocab and tensor.shape[0] != self._padded_vocab:
            rows = min(tensor.shape[0], self._padded_vocab)
            out = tensor.new_zeros((self._padded_vocab, *tensor.shape[1:]))
            out[:rows] = tensor[:rows]
            tensor = out
        return tensor
