"""The one helper multi-process tests use: launch something under torchrun on this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

DIST_DIR = Path(__file__).parent / "dist"
ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    nproc: int,
    *target: str,
    check: bool = True,
    timeout: int = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """torchrun `target` (a script path, or "-m", module, then its arguments) on `nproc` CPU
    processes, with `env` added to the environment; with `check`, a failure raises with the
    tail of its output."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *map(str, target),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **ENV, **(env or {})},
    )
    if check and proc.returncode != 0:
        out = proc.stdout + proc.stderr
        raise AssertionError(
            f"{' '.join(cmd[3:])} failed with exit code {proc.returncode}:\n{out[-6000:]}"
        )
    return proc


def torchrun(
    script: str, nproc: int, *args: str, timeout: int = 600, env: dict[str, str] | None = None
) -> str:
    """Run tests/dist/<script>; return its output."""
    proc = launch(nproc, DIST_DIR / script, *args, timeout=timeout, env=env)
    return proc.stdout + proc.stderr
