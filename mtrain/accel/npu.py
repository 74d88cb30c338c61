"""Ascend NPU backend: torch_npu maps cuda -> npu and nccl -> hccl; MindSpeed when importable."""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import torch

NAME = "npu"
DIST_BACKEND = "hccl"

# Runtime defaults for NPU runs; a value the user already set is kept.
RUNTIME_ENV = {
    "TASK_QUEUE_ENABLE": "2",
    "CPU_AFFINITY_CONF": "1",
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
    "HCCL_CONNECT_TIMEOUT": "1800",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
}


def install_shim() -> None:
    """Import torch_npu and its cuda->npu mapping (must precede any megatron import)."""
    for key, value in RUNTIME_ENV.items():
        os.environ.setdefault(key, value)
    import torch_npu  # noqa: F401
    from torch_npu.contrib import transfer_to_npu  # noqa: F401

    torch.npu.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # type: ignore[attr-defined]


def device() -> torch.device:
    return torch.device("npu", torch.npu.current_device())  # type: ignore[attr-defined]


def device_count() -> int:
    return torch.npu.device_count()  # type: ignore[attr-defined]


def mindspeed_available() -> bool:
    return importlib.util.find_spec("mindspeed") is not None


def cann_version() -> str | None:
    """CANN toolkit version from its install info file, if a toolkit is installed."""
    roots = [
        os.environ.get("ASCEND_TOOLKIT_HOME"),
        os.environ.get("ASCEND_HOME_PATH"),
        "/usr/local/Ascend/ascend-toolkit/latest",
    ]
    for root in filter(None, roots):
        for info in glob.glob(os.path.join(root, "*", "ascend_toolkit_install.info")) + glob.glob(
            os.path.join(root, "ascend_toolkit_install.info")
        ):
            match = re.search(r"^version=(.+)$", open(info).read(), re.M)
            if match:
                return match.group(1).strip()
    return None


def describe() -> dict[str, str]:
    info = {"npus": str(device_count())}
    if device_count():
        info["npu"] = torch.npu.get_device_name(0)  # type: ignore[attr-defined]
    visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    if visible:
        info["ASCEND_RT_VISIBLE_DEVICES"] = visible
    return info
