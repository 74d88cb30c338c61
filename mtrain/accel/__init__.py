"""Device backends. Code outside this package says `accel.device()` / `accel.dist_backend()`,
never a device literal.

`start(cfg, plan, num_layers)` (training commands) or `activate("auto" | "cpu" | "cuda" | "npu")` picks the
backend once per process, before megatron is imported by anything that runs on it, and applies
its set-up (the CPU shim, torch_npu's device mapping, MindSpeed's patches). This module imports
torch lazily: `mtrain/__init__.py` must set the Ascend environment before torch loads.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mtrain.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mtrain.accel")
NAMES = ("cpu", "cuda", "npu")
_active: ModuleType | None = None


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


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


def resolve_kernels(requested: str, device_name: str) -> str:
    """The layer implementation `kernels=requested` stands for on `device_name` (see
    mtrain/config/kernels.py); refuse one this machine cannot run."""
    if requested == "auto":
        if device_name == "cuda":
            return "te" if installed("transformer_engine") else "sdpa"
        if device_name == "npu":
            return "mindspeed" if installed("mindspeed") else "torch_npu"
        return "local"
    if requested == "te" and (device_name != "cuda" or not installed("transformer_engine")):
        raise ConfigError(
            f"kernels=te needs device=cuda with transformer_engine installed (device="
            f"{device_name}); use kernels=auto"
        )
    if requested == "mindspeed" and (device_name != "npu" or not installed("mindspeed")):
        raise ConfigError(
            f"kernels=mindspeed needs device=npu with MindSpeed installed (device={device_name}"
            f", MindSpeed {'found' if installed('mindspeed') else 'not found'}); see the README's "
            "'Ascend NPU' section, or use kernels=torch_npu"
        )
    if requested == "torch_npu" and not installed("torch_npu"):
        raise ConfigError("kernels=torch_npu needs torch_npu installed; use kernels=auto")
    return requested


def module(name: str) -> ModuleType:
    return importlib.import_module(f"mtrain.accel.{name}")


def activate(name: str = "auto") -> ModuleType:
    """Select and set up the backend for this process (idempotent for the same backend)."""
    global _active
    backend = module(resolve(name))
    if _active is not None and _active is not backend:
        raise RuntimeError(
            f"backend {_active.NAME} is already active; cannot switch to "
            f"{backend.NAME} in the same process"
        )
    backend.install_shim()
    _active = backend
    return backend


def start(cfg: Any, plan: Any, num_layers: int) -> str:
    """Set up the device and kernels of a training command; returns the resolved `kernels`.

    Order matters on Ascend: torch_npu and its cuda->npu mapping, then MindSpeed's adaptor with
    the run's flags, all before the first megatron import.
    """
    from mtrain.accel import kernels as layers
    from mtrain.accel import mindspeed

    name = resolve(cfg.device)
    kernels = resolve_kernels(cfg.kernels, name)
    if kernels == "te" and cfg.finetuning_type == "lora":
        if cfg.kernels == "te":
            raise ConfigError(
                "kernels=te with finetuning_type=lora: Transformer Engine fuses the input norm "
                "into linear_qkv / linear_fc1, so adapters there would see un-normalised inputs;"
                " use kernels=sdpa (what kernels=auto picks for LoRA on CUDA)"
            )
        kernels = "sdpa"
        log.info("kernels: sdpa, not te: LoRA adapters need the unfused input norms")
    layers.check(kernels, cfg.npu, cfg.parallel.sequence_parallel)
    mindspeed.check(cfg, plan, kernels)
    argv = None
    if kernels == "mindspeed":
        packed = bool(getattr(cfg.data, "packing", False))
        argv = mindspeed.flags(cfg, plan, num_layers, packed=packed)
    activate(name)
    if argv is not None:
        mindspeed.install(argv)
    return kernels


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
