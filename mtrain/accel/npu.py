"""Ascend NPU backend: torch_npu maps cuda -> npu and nccl -> hccl (MindSpeed: mtrain/kernels)."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable

import torch

from mtrain.errors import ConfigError

NAME = "npu"
DIST_BACKEND = "hccl"


def install_shim(before_megatron: Callable[[], None] | None = None) -> None:
    """Import torch_npu and its cuda->npu mapping (must precede any megatron import), and bind
    this process to its NPU among the visible ones (ASCEND_RT_VISIBLE_DEVICES); then run
    `before_megatron` (MindSpeed's adaptor). The runtime environment was set when `mtrain` was
    imported (accel/runtime_env.py)."""
    import torch_npu  # noqa: F401
    from torch_npu.contrib import transfer_to_npu  # noqa: F401

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = device_count()
    if local_rank >= count:
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        seen = f"ASCEND_RT_VISIBLE_DEVICES={visible}" if visible else "all NPUs visible"
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but this node shows {count} NPU(s) ({seen}); start at "
            f"most {count} processes per node (torchrun --nproc_per_node / NPROC_PER_NODE)"
        )
    torch.npu.set_device(local_rank)  # type: ignore[attr-defined]
    if before_megatron is not None:
        before_megatron()


def device() -> torch.device:
    return torch.device("npu", torch.npu.current_device())  # type: ignore[attr-defined]


def device_count() -> int:
    return torch.npu.device_count()  # type: ignore[attr-defined]


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


def _release(version: str) -> str:
    """'2.7.1' of '2.7.1+cpu', '2.7.1.post1', '2.7.1rc1'."""
    match = re.match(r"\d+(\.\d+){0,2}", version)
    return match.group(0) if match else version


def version_warnings(versions: dict[str, str | None]) -> list[str]:
    """Known-bad version combinations among torch, torch-npu, megatron-core and MindSpeed."""
    out = []
    torch_v, npu_v = versions.get("torch"), versions.get("torch-npu")
    if torch_v and npu_v and _release(torch_v) != _release(npu_v):
        out.append(
            f"torch {torch_v} does not match torch-npu {npu_v}: torch_npu only works with the "
            f"torch release it was built for; pip install torch=={_release(npu_v)}"
        )
    core, mindspeed = versions.get("megatron-core"), versions.get("mindspeed")
    if mindspeed and core and not _release(core).startswith("0.12."):
        out.append(
            f"MindSpeed is installed but megatron-core is {core}: the MindSpeed branches mtrain "
            "supports (e.g. 2.3.0_core_r0.12.1) patch megatron-core 0.12.x; pip install "
            "megatron-core==0.12.1"
        )
    return out


def describe() -> dict[str, str]:
    info = {"npus": str(device_count())}
    if device_count():
        info["npu"] = torch.npu.get_device_name(0)  # type: ignore[attr-defined]
    visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    if visible:
        info["ASCEND_RT_VISIBLE_DEVICES"] = visible
    return info
