"""All-or-nothing output directories: a converter either leaves a complete result or nothing.

Everything is written into a hidden sibling directory, which replaces `out_dir` only once
complete. With `force=True` an existing `out_dir` is removed only after the new one is whole, so
an interrupted run never destroys what was there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mtrain.errors import ConfigError


def check_output_dir(out_dir: Path, force: bool, inputs: list[Path]) -> None:
    out = out_dir.resolve()
    for src in inputs:
        src = src.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ConfigError(f"out_dir={out_dir} overlaps the input {src}; choose another out_dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir={out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConfigError(
            f"out_dir={out_dir} is not empty; choose an empty directory or pass "
            "force=true to replace it"
        )


@contextmanager
def atomic_output_dir(out_dir: Path, force: bool, inputs: list[Path]) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes `out_dir`, on failure it is removed."""
    check_output_dir(out_dir, force, inputs)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _fsync_tree(temp)
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    temp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)


def _fsync_tree(root: Path) -> None:
    """Flush file contents to disk before the rename makes them visible as the result."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
