"""The one helper multi-process tests use: run a worker script under torchrun on this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

DIST_DIR = Path(__file__).parent / "dist"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, nproc: int, *args: str, timeout: int = 600) -> str:
    """Run tests/dist/<script> on `nproc` CPU processes; return its output, fail with its tail."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(DIST_DIR / script),
        *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed with exit code {proc.returncode}:\n{out[-6000:]}")
    return out
