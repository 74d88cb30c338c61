"""Device backends. Code outside this package says `accel.device()` / `accel.dist_backend()`,
never a device literal.

`activate("auto" | "cpu" | "cuda" | "npu")` picks the backend once per process, before megatron
is imported by anything that runs on it, and applies its set-up (the CPU shim, torch_npu's device
mapping). Training commands call it through `mtrain.kernels.start`, which also installs
MindSpeed's patches; the layer choices (`kernels=`) live in mtrain/kernels, not here. This module
imports torch lazily: `mtrain/__init__.py` must set the Ascend environment before torch loads.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

from mtrain.errors import ConfigError

if TYPE_CHECKING:
    import torch

NAMES = ("cpu", "cuda", "npu")
_active: ModuleType | None = None


def installed(package: str) -> bool:
    """Whether `package` is really installed: a module in sys.modules whose spec has neither a
    loader nor search locations (not a namespace package either) is a stand-in (MindSpeed's
    adaptor registers dummy `transformer_engine` modules so that megatron-core's TE imports
    succeed on Ascend) and does not count."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # ValueError: in sys.modules with __spec__ None
        return False
    return spec is not None and (
        spec.loader is not None or spec.submodule_search_locations is not None
    )


def npu_available() -> bool:
    if not installed("torch_npu"):
        return False
    try:
        import torch
        import torch_npu  # noqa: F401

        return torch.npu.is_available()  # type: ignore[attr-defined]
    except Exception:  # a broken CANN install is reported by `python -m mtrain.env`
        return False


def resolve(name: str = "auto") -> str:
    """The backend name `name` stands for on this machine; refuse one that is not there."""
    import torch

    if name == "auto":
        if npu_available():
            return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in NAMES:
        raise ConfigError(f"device={name} is not one of auto, {', '.join(NAMES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA device; use device=cpu or auto")
    if name == "npu" and not npu_available():
        raise ConfigError(
            "device=npu but torch_npu is not installed or sees no NPU; see the "
            "README's 'Ascend NPU' section, or run `python -m mtrain.env`"
        )
    return name


def module(name: str) -> ModuleType:
    return importlib.import_module(f"mtrain.accel.{name}")


def activate(name: str = "auto", before_megatron: Callable[[], None] | None = None) -> ModuleType:
    """Select and set up the backend for this process (idempotent for the same backend).

    `before_megatron` runs inside the set-up, after the device's torch-level mapping and before
    anything of the backend imports megatron (MindSpeed's adaptor must patch megatron first)."""
    global _active
    backend = module(resolve(name))
    if _active is not None and _active is not backend:
        raise RuntimeError(
            f"backend {_active.NAME} is already active; cannot switch to "
            f"{backend.NAME} in the same process"
        )
    backend.install_shim(before_megatron)
    _active = backend
    return backend


def current() -> ModuleType:
    if _active is None:
        raise RuntimeError("no device backend is active; call mtrain.accel.activate() first")
    return _active


def device() -> torch.device:
    return current().device()


def dist_backend() -> str:
    return current().DIST_BACKEND


def peak_tflops() -> float | None:
    """Dense bf16 peak TFLOP/s of the active device, when known (see accel/peak.py)."""
    from mtrain.accel.peak import peak_tflops as lookup

    info = current().describe()
    return lookup(info.get("gpu") or info.get("npu"))
