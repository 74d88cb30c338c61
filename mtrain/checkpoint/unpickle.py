"""Open a torch zip checkpoint of any pickle protocol without running code named in it.

MindSpeed-LLM saves its rank files with `torch.save(..., pickle_protocol=4)`. torch's
`weights_only=True` loader interprets only the opcodes of protocol 2 (torch 2.13 stops at
protocol 4's FRAME: "Unsupported operand 149"), and `weights_only=False` calls whatever the file
names. `load_restricted` lets Python's own unpickler read the pickle, which knows every protocol
(0-5), and resolves only the globals a Megatron-LM, MindSpeed-LLM or mtrain rank file holds; a
file that names any other is refused at that name, before anything it asks for is called.

It is the pure-Python `pickle._Unpickler` (speed matters little for the small data.pkl) because
its opcode table can be amended: the stock BUILD would set attributes on an admitted global
itself (`argparse.Namespace.x = ...` for the whole process) or on an enum member; here BUILD may
change only objects the file built. `load_restricted_pickle` reads a plain pickle the same way.

The archive, as `torch.save` writes it since torch 1.6:

    <archive>/data.pkl     the pickled object; a tensor names its storage by a persistent id
                           ('storage', storage type, key, location, numel)
    <archive>/data/<key>   that storage's raw bytes (numel elements of the storage type's dtype)
    <archive>/byteorder    b"little" or b"big", the byte order of every data/<key> (absent in
                           older files: little)
    <archive>/version, .format_version, .storage_alignment, .data/serialization_id: not needed

Storages are rebuilt on the CPU whatever location they were saved from (cuda:0, npu:0).
"""

from __future__ import annotations

import _compat_pickle
import argparse
import enum
import importlib
import io
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from copyreg import _reconstructor
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mtrain.errors import CheckpointError

# The storage classes torch names in a storage's persistent id: all a storage needs from one is its
# element dtype, so the pickle gets a `_StorageType`, not the class. Tensors of newer dtypes
# (uint16, float8, ...) name `torch.storage.UntypedStorage` (bytes) and carry their dtype in
# `_rebuild_tensor_v3`.
_STORAGE_DTYPES = {
    "torch.DoubleStorage": torch.float64,
    "torch.FloatStorage": torch.float32,
    "torch.HalfStorage": torch.float16,
    "torch.BFloat16Storage": torch.bfloat16,
    "torch.LongStorage": torch.int64,
    "torch.IntStorage": torch.int32,
    "torch.ShortStorage": torch.int16,
    "torch.CharStorage": torch.int8,
    "torch.ByteStorage": torch.uint8,
    "torch.BoolStorage": torch.bool,
    "torch.ComplexDoubleStorage": torch.complex128,
    "torch.ComplexFloatStorage": torch.complex64,
    "torch.storage.UntypedStorage": torch.uint8,
}

# Enums Megatron-LM stores in a rank file: `args.model_type`, `args.attention_backend`, and the
# rerun state machine's `mode`, `state` and error-injection type. Each is imported only when a file
# names it, and admitted only if it is an enum.
_ENUMS = frozenset(
    {
        "megatron.core.enums.ModelType",
        "megatron.core.transformer.enums.ModelType",
        "megatron.core.transformer.enums.AttnBackend",
        "megatron.core.rerun_state_machine.RerunMode",
        "megatron.core.rerun_state_machine.RerunState",
        "megatron.core.rerun_state_machine.RerunDiagnostic",
    }
)

_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # torch < 1.6 files open with it
_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 16 << 20  # bytes read from a record at a time

# Under protocol 0 a persistent id is written as the str() of torch's tuple.
_PROTOCOL0_ID = re.compile(r"\('storage', <class '([\w.]+)'>, '(\w+)', '([\w:]*)', (\d+)\)")


class _StorageType:
    """Stands for a storage class in the pickle; see `_STORAGE_DTYPES`."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


@lru_cache(maxsize=1)
def _admitted() -> dict[str, Any]:
    """Every global `find_class` resolves, by the `module.name` the pickle writes (after Python
    2 names are mapped to Python 3 ones, as the stock unpickler does), except the enums."""
    admitted: dict[str, Any] = {
        # tensors: a plain one, a Parameter, one with Python attributes (Megatron's fp32 main
        # params carry tensor_model_parallel, partition_dim, ...)
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": torch._utils._rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
        "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
        "torch.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.Size": torch.Size,
        # containers
        "collections.OrderedDict": OrderedDict,
        "collections.defaultdict": lambda *_: {},  # MindSpeed-LLM's hf2mg `model`; factory dropped
        "builtins.dict": dict,
        "argparse.Namespace": argparse.Namespace,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "builtins.slice": slice,
        "builtins.range": range,
        "builtins.bytes": bytes,
        "builtins.bytearray": bytearray,
        # protocols 0 and 1 build an object as _reconstructor(cls, object, None)
        "copyreg._reconstructor": _reconstructor,
        "builtins.object": object,
    }
    # a dtype pickles as the global torch.<name> (torch.float32.__reduce__() == "float32")
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            admitted[f"torch.{name}"] = value
    admitted.update(_numpy_admitted())
    return admitted


def _numpy_admitted() -> dict[str, Any]:
    """numpy arrays, dtypes and scalars (the numpy RNG state). numpy 2 moved `numpy.core` to
    `numpy._core`; a file written under either names its own, and both resolve here."""
    try:
        import numpy
    except ImportError:
        return {}
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
        numeric = importlib.import_module("numpy._core.numeric")
    except ImportError:  # numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
        numeric = importlib.import_module("numpy.core.numeric")
    admitted: dict[str, Any] = {"numpy.ndarray": numpy.ndarray, "numpy.dtype": numpy.dtype}
    for core in ("numpy.core", "numpy._core"):
        admitted[f"{core}.multiarray._reconstruct"] = multiarray._reconstruct  # protocols 0-4
        admitted[f"{core}.multiarray.scalar"] = multiarray.scalar
        admitted[f"{core}.numeric._frombuffer"] = numeric._frombuffer  # protocol 5
    return admitted


class _RestrictedUnpickler(pickle._Unpickler):
    """Resolves only `_admitted()` globals and the Megatron enums; rebuilds storages from the
    archive's data/<key> records, each once however many tensors view it."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(
        self,
        path: Path,
        archive: zipfile.ZipFile | None,
        prefix: str = "",
        byteorder: str = "little",
        extra: dict[str, Any] | None = None,
        pickled: bytes | None = None,
    ):
        self._path = path
        self._archive = archive  # None: a plain pickle (no storages)
        self._prefix = prefix
        self._byteorder = byteorder
        self._extra = extra or {}  # globals admitted for this file only
        self._storages: dict[str, torch.storage.TypedStorage] = {}
        self._globals: dict[int, tuple[Any, str]] = {}  # id -> (what find_class gave, its name)
        super().__init__(io.BytesIO(pickled or archive.read(f"{prefix}/data.pkl")))

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # Python 2 names, mapped as the stock unpickler does
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualname = f"{module}.{name}"
        admitted = _admitted()
        if qualname in _STORAGE_DTYPES:
            found: Any = _StorageType(_STORAGE_DTYPES[qualname])
        elif qualname == "_codecs.encode":
            found = self._latin1_bytes
        elif qualname in _ENUMS:
            found = self._enum(module, name)
        elif qualname in admitted:
            found = admitted[qualname]
        elif qualname in self._extra:
            found = self._extra[qualname]
        else:
            raise self._refused(qualname)
        self._globals[id(found)] = (found, qualname)
        return found

    def _load_build(self) -> None:
        """BUILD only on an object the file built (a Namespace, an array): never on a global,
        a class or function, or an enum member, each shared by the whole process."""
        target = self.stack[-2]  # BUILD pops the state and updates the object under it
        found, what = self._globals.get(id(target), (None, ""))
        if found is not target:
            if not (callable(target) or isinstance(target, enum.Enum)):
                pickle._Unpickler.load_build(self)
                return
            what = f"a {type(target).__module__}.{type(target).__qualname__}"
        raise CheckpointError(
            f"{self._path}: refused to open: it asks to set attributes on {what}, which no "
            "checkpoint does; this file is not a checkpoint mtrain will open"
        )

    dispatch[pickle.BUILD[0]] = _load_build

    def persistent_load(self, pid: Any) -> torch.storage.TypedStorage:
        if self._archive is None:
            raise CheckpointError(f"{self._path}: refers to a storage, which this file cannot hold")
        if isinstance(pid, str):
            pid = self._protocol0_id(pid)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(
                f"{self._path}: refers to {pid!r:.200}, which is not a torch storage; this "
                "file is not a checkpoint mtrain will open"
            )
        _, storage_type, key, _location, numel = pid
        if not (
            isinstance(storage_type, _StorageType)
            and isinstance(key, str)
            and isinstance(numel, int)
            and numel >= 0
        ):
            raise CheckpointError(f"{self._path}: a storage id {pid!r:.200} is malformed")
        dtype = storage_type.dtype
        if key not in self._storages:
            untyped = self._read_storage(key, numel * dtype.itemsize)
            if self._byteorder != sys.byteorder:
                untyped.byteswap(dtype)
            self._storages[key] = torch.storage.TypedStorage(
                wrap_storage=untyped, dtype=dtype, _internal=True
            )
        return self._storages[key]

    def _read_storage(self, key: str, nbytes: int) -> torch.UntypedStorage:
        """The bytes of record data/<key>, read in chunks into the storage's own buffer (no
        second copy of a large record)."""
        name = f"{self._prefix}/data/{key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise CheckpointError(
                f"{self._path}: has no record {name} (a tensor's data); the file is incomplete"
            ) from None
        if info.file_size != nbytes:
            raise CheckpointError(
                f"{self._path}: record {name} holds {info.file_size} bytes, but its tensors "
                f"need {nbytes}; the file is damaged"
            )
        if nbytes == 0:
            return torch.UntypedStorage(0)
        buffer = bytearray(nbytes)
        view = memoryview(buffer)
        with self._archive.open(info) as record:  # the zip checks each record's CRC-32
            done = 0
            while done < nbytes:
                chunk = record.read(min(_CHUNK, nbytes - done))  # (readinto is 4x slower)
                if not chunk:
                    raise CheckpointError(f"{self._path}: record {name} ends early; truncated")
                view[done : done + len(chunk)] = chunk
                done += len(chunk)
        # the storage keeps `buffer` alive and reads it in place
        return torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()

    def _protocol0_id(self, pid: str) -> tuple:
        found = _PROTOCOL0_ID.fullmatch(pid)
        if found is None:
            raise CheckpointError(f"{self._path}: a storage id {pid!r:.200} is malformed")
        storage_class, key, location, numel = found.groups()
        module, _, name = storage_class.rpartition(".")
        return ("storage", self.find_class(module, name), key, location, int(numel))

    def _enum(self, module: str, name: str) -> type[enum.Enum]:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError as err:
            why = " ".join(str(err).split())
            raise CheckpointError(
                f"{self._path}: holds a {module}.{name}, and {module} cannot be imported here "
                f"({why}); install the package that defines it (megatron-core) to open this file"
            ) from None
        if not (isinstance(found, type) and issubclass(found, enum.Enum)):
            raise self._refused(f"{module}.{name}")
        return found

    def _latin1_bytes(self, text: str, encoding: str = "latin1") -> bytes:
        """`_codecs.encode` as protocols 0-2 store a bytes object: encode(text, "latin1"). Other
        codecs (zlib, bz2, ...) would decompress attacker-sized data; no checkpoint uses them."""
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise self._refused(f"_codecs.encode(..., {encoding!r})")
        return text.encode("latin1")

    def _refused(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self._path}: refused to open: it asks to unpickle {what}, which no checkpoint "
            "holds; this file is not a checkpoint mtrain will open"
        )


def load_restricted(path: Path) -> Any:
    """The object a torch zip checkpoint holds, with its tensors on the CPU. For the files torch's
    `weights_only` loader cannot read (pickle protocols 0, 1, 4 and 5 in torch 2.13; MindSpeed-LLM
    writes 4): only tensors, numpy arrays, containers, `argparse.Namespace` and Megatron's enums
    are built, and a file that names any other global is refused before anything runs. Every
    record is read into memory (no mmap) and its CRC-32 checked."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found; the checkpoint is incomplete")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise _not_a_zip(path, err) from None
    with archive:
        names = archive.namelist()
        prefix = names[0].split("/", 1)[0] if names else ""
        if f"{prefix}/data.pkl" not in names:
            raise CheckpointError(
                f"{path}: a zip archive without {prefix or '<archive>'}/data.pkl; "
                "it was not written by torch.save"
            )
        byteorder = _byteorder(path, archive, prefix)
        try:
            return _RestrictedUnpickler(path, archive, prefix, byteorder).load()
        except CheckpointError:
            raise
        except Exception as err:  # a damaged pickle raises many types, from pickle and torch
            why = " ".join(str(err).split())
            raise CheckpointError(
                f"{path}: cannot be read as a checkpoint file ({type(err).__name__}: {why})"
            ) from None


def load_restricted_pickle(path: Path, extra: dict[str, Any]) -> Any:
    """A plain pickle (no tensors) naming only admitted globals and `extra` (dataclasses...)."""
    try:
        pickled = Path(path).read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err})") from None
    try:
        return _RestrictedUnpickler(Path(path), None, extra=extra, pickled=pickled).load()
    except CheckpointError:
        raise
    except Exception as err:  # a damaged pickle raises many types
        why = " ".join(str(err).split())
        raise CheckpointError(
            f"{path}: not a readable pickle ({type(err).__name__}: {why})"
        ) from None


def _byteorder(path: Path, archive: zipfile.ZipFile, prefix: str) -> str:
    try:
        recorded = archive.read(f"{prefix}/byteorder")
    except KeyError:
        return "little"  # what torch assumes for files that predate the record
    except (zipfile.BadZipFile, OSError) as err:
        raise _not_a_zip(path, err) from None
    if recorded not in (b"little", b"big"):
        raise CheckpointError(
            f"{path}: {prefix}/byteorder says {recorded[:20]!r}; expected b'little' or b'big'"
        )
    return recorded.decode()


def _not_a_zip(path: Path, err: Exception) -> CheckpointError:
    """Say what the file is instead: a damaged zip, a pre-1.6 torch file, or something else."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as read_err:
        return CheckpointError(f"{path}: cannot be read ({read_err})")
    why = " ".join(str(err).split())
    if head.startswith(_ZIP_MAGIC):
        return CheckpointError(
            f"{path}: a truncated or damaged zip archive ({why}); copy or save it again"
        )
    if head[:1] == b"\x80" and head[2:4] == b"\x8a\x0a" and head[4:14] == _LEGACY_MAGIC:
        return CheckpointError(
            f"{path}: written in torch's legacy (pre-1.6, non-zip) format, which mtrain does not "
            "open; load it where you trust it and save it again with torch >= 1.6"
        )
    if not head:
        return CheckpointError(f"{path}: is empty; the checkpoint is incomplete")
    return CheckpointError(f"{path}: not a torch checkpoint (not a zip archive: {why})")
