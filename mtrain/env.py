"""`python -m mtrain.env [device=auto]`: what this machine has, and which backend mtrain picks.

The first thing to run on a new machine, and the first thing to paste into a bug report.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import sys
from dataclasses import dataclass

import torch

from mtrain import accel, kernels
from mtrain.accel import npu, runtime_env
from mtrain.accel.runtime_env import NPU_DEFAULTS
from mtrain.cli import hydra_command
from mtrain.kernels import mindspeed

log = logging.getLogger("mtrain.env")

PACKAGES = (
    "torch",
    "megatron-core",
    "transformers",
    "safetensors",
    "hydra-core",
    "torch-npu",
    "mindspeed",
    "transformer-engine",
    "mtrain",
)


@dataclass
class EnvConfig:
    device: str = "auto"  # the backend to check: auto | cpu | cuda | npu


def package_version(name: str) -> str | None:
    """The installed distribution's version, read from its metadata files.

    Not `importlib.metadata.version`: MindSpeed's adaptor wraps it to report transformer-engine
    2.2.0 when no Transformer Engine is installed."""
    try:
        return importlib.metadata.distribution(name).version
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    found = {name: package_version(name) for name in PACKAGES}
    if accel.installed("mindspeed"):
        # Every MindSpeed branch for core 0.12.1 reports 0.12.1: name the release by its files.
        base = found["mindspeed"] or "importable, version unknown"
        found["mindspeed"] = f"{base} (release {mindspeed.release()})"
    return found


def report(device: str = "auto") -> list[tuple[str, str]]:
    rows = [("python", sys.version.split()[0]), ("platform", platform.platform())]
    found = versions()
    rows += [(name, version or "not installed") for name, version in found.items()]
    rows.append(("CANN", npu.cann_version() or "not found"))
    rows.append(
        ("cuda devices", str(torch.cuda.device_count()) if torch.cuda.is_available() else "0")
    )
    rows.append(("npu devices", str(npu.device_count()) if accel.npu_available() else "0"))
    picked = accel.resolve(device)
    for key, value in accel.module(picked).describe().items():
        rows.append((f"{picked}.{key}", value))
    rows.append(("backend", f"{picked} ({accel.module(picked).DIST_BACKEND})"))
    rows.append(("kernels (auto)", kernels.resolve_kernels("auto", picked)))
    if picked == "npu":
        for key in NPU_DEFAULTS:
            where = " (mtrain default)" if key in runtime_env.APPLIED else ""
            rows.append((key, os.environ.get(key, "unset") + where))
    rows += [("WARNING", text) for text in npu.version_warnings(found)]
    return rows


@hydra_command("env", EnvConfig)
def main(cfg: EnvConfig) -> None:
    rows = report(cfg.device)
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
