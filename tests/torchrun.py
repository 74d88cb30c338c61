"""The one helper multi-process tests use: launch something under torchrun on this machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
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


def launch_nodes(
    nnodes: int,
    nproc: int,
    *target: str,
    timeout: int = 600,
    env: dict[str, str] | None = None,
) -> list[str]:
    """torchrun `target` as `nnodes` nodes of `nproc` CPU processes each, all on this machine
    (one torchrun per node, static rendezvous on loopback); returns each node's output, and
    raises with the tails when a node fails."""
    port = free_port()
    run = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}"]
    where = [f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}"]
    outs = [tempfile.TemporaryFile("w+") for _ in range(nnodes)]
    procs = [
        subprocess.Popen(
            [*run, f"--node_rank={r}", *where, *map(str, target)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **ENV, **(env or {})},
            start_new_session=True,  # its own process group: a timeout ends its workers too
        )
        for r, out in enumerate(outs)
    ]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = []
    for out in outs:
        out.seek(0)
        texts.append(out.read())
        out.close()
    if any(codes):
        tails = "\n".join(f"--- node {r}:\n{t[-3000:]}" for r, t in enumerate(texts))
        raise AssertionError(f"{' '.join(map(str, target))}: exit codes {codes}\n{tails}")
    return texts


def run_many(
    nproc: int,
    plan: dict,
    workdir: Path,
    name: str = "runs",
    timeout: int = 600,
    env: dict[str, str] | None = None,
) -> tuple[dict, str]:
    """Run `plan` ({run: [command, [override, ...]]}, in order) as `python -m mtrain.<command>`
    would, all in one torchrun of tests/dist/runs.py on `nproc` processes (process start-up is
    most of a tiny run); returns ({run: metrics per iteration}, the torchrun's output)."""
    spec, result = workdir / f"{name}.json", workdir / f"{name}_result.json"
    spec.write_text(json.dumps(plan, default=str))
    proc = launch(nproc, DIST_DIR / "runs.py", spec, result, timeout=timeout, env=env)
    return json.loads(result.read_text()), proc.stdout + proc.stderr


def torchrun(
    script: str, nproc: int, *args: str, timeout: int = 600, env: dict[str, str] | None = None
) -> str:
    """Run tests/dist/<script>; return its output."""
    proc = launch(nproc, DIST_DIR / script, *args, timeout=timeout, env=env)
    return proc.stdout + proc.stderr
