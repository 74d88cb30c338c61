"""`python -m mtrain.env [device=auto]`: what this machine has, and which backend mtrain picks.

The first thing to run on a new machine, and the first thing to paste into a bug report.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import sys
from dataclasses import dataclass

import torch

from mtrain import accel
from mtrain.accel import npu
from mtrain.cli import hydra_command

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
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def report(device: str = "auto") -> list[tuple[str, str]]:
    rows = [("python", sys.version.split()[0]), ("platform", platform.platform())]
    for name in PACKAGES:
        version = package_version(name)
        if version is None and name == "mindspeed" and npu.mindspeed_available():
            version = "importable (version unknown)"
        rows.append((name, version or "not installed"))
    rows.append(("CANN", npu.cann_version() or "not found"))
    rows.append(
        ("cuda devices", str(torch.cuda.device_count()) if torch.cuda.is_available() else "0")
    )
    rows.append(("npu devices", str(npu.device_count()) if accel.npu_available() else "0"))
    picked = accel.resolve(device)
    for key, value in accel.module(picked).describe().items():
        rows.append((f"{picked}.{key}", value))
    rows.append(("backend", f"{picked} ({accel.module(picked).DIST_BACKEND})"))
    return rows


@hydra_command("env", EnvConfig)
def main(cfg: EnvConfig) -> None:
    rows = report(cfg.device)
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
