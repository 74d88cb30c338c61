"""All-or-nothing writes: a reader sees the old result or the complete new one, never a torn one.

Two shapes, one recipe (write under a hidden temporary name next to the result, fsync, rename):
- `atomic_output_dir`: a whole output directory (converters, PEFT export, the tiny model). With
  `force=True` an existing `out_dir` is removed only after the new one is whole, so an
  interrupted run never destroys what was there.
- `atomic_paths` / `atomic_write`: single files or a group of files committed in order (the
  checkpoint tracker, the DPO reference cache, the tokenized data caches).

Temporary names carry the process id and a random tag, so processes on nodes sharing the file
system never write to the same one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mtrain.errors import ConfigError
from mtrain.paths import check_directory


def fsync(path: Path) -> None:
    """Flush a file's contents (or, for a directory, its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A hidden name next to `path`, unique among processes, also on other nodes."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")


@contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[tuple[Path, ...]]:
    """Yield a temporary path for each of `paths` to write. When the block succeeds each is
    fsynced and renamed onto its path, in the given order, so the presence of the last one means
    every one is complete; when it fails nothing is replaced. No temporary outlives the block."""
    finals = [Path(p) for p in paths]
    temps = tuple(temp_path(p) for p in finals)
    try:
        yield temps
        for temp in temps:
            fsync(temp)
        for temp, final in zip(temps, finals):
            temp.replace(final)
        for parent in dict.fromkeys(final.parent for final in finals):
            fsync(parent)  # make the renames themselves durable
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Replace the file `path` by `data` (text is UTF-8), all or nothing."""
    with atomic_paths(path) as (temp,):
        if isinstance(data, str):
            temp.write_text(data, encoding="utf-8")
        else:
            temp.write_bytes(data)


def check_output_dir(out_dir: Path, force: bool, inputs: list[Path]) -> None:
    out = out_dir.resolve()
    for src in inputs:
        src = src.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ConfigError(f"out_dir={out_dir} overlaps the input {src}; choose another out_dir")
    check_directory("out_dir", out_dir)
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
            fsync(path)
