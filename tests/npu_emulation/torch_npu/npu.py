"""TEST-ONLY `torch_npu.npu` / `torch.npu` for MindSpeed on CPU (see `_host.py`).

One CPU "device" per process that reports itself unavailable, so `torch.npu.is_available()` is
False and mtrain's `device=auto` still answers "cpu". The calls MindSpeed makes regardless of
availability get CPU answers: device 0 of 1, no-op synchronisation, the CPU default generator as
the device generator, callbacks run at once.
"""

from __future__ import annotations

import contextlib

import torch

default_generators = (torch.default_generator,)


def is_available() -> bool:
    return False


def device_count() -> int:
    return 1


def current_device() -> int:
    return 0


def set_device(device) -> None:
    pass


def synchronize(device=None) -> None:
    pass


def get_device_name(device=None) -> str:
    return "CPU (torch_npu emulation)"


def _lazy_call(callable, **kwargs) -> None:
    """torch_npu queues device calls until the device is initialised; on CPU there is no wait."""
    callable()


class device(contextlib.nullcontext):
    """`with torch_npu.npu.device(i)`: there is one device, so entering it changes nothing."""

    def __init__(self, device=None):
        super().__init__()
