"""Can a path be written? Checks made before anything is written, with one-line answers that
name the key the path came from. Nothing here creates anything."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mtrain.errors import ConfigError

GiB = 1024**3


def _existing_ancestor(key: str, value: str | Path, path: Path) -> Path:
    """The nearest part of `path` that exists; it must be a writable directory."""
    parent = next(p for p in (path, *path.parents) if p.exists())
    if not parent.is_dir():
        raise ConfigError(
            f"{key}={value}: {parent} is a file, so nothing can be created below it; "
            "choose another location"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{key}={value}: {parent} is not writable by this user; choose a writable location"
        )
    return parent


def check_directory(key: str, value: str | Path, need_bytes: float = 0.0) -> None:
    """`value` is, or can become, a writable directory with `need_bytes` free."""
    path = Path(value).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={value} exists and is not a directory; choose a directory")
    base = _existing_ancestor(key, value, path)
    if need_bytes:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            raise ConfigError(
                f"{key}={value}: {free / GiB:.1f} GiB free on its filesystem, but one checkpoint "
                f"of this run takes about {need_bytes / GiB:.1f} GiB; free space or choose "
                "another location"
            )


def check_file(key: str, value: str | Path) -> None:
    """`value` is a writable file, or one that can be created."""
    path = Path(value).expanduser().absolute()
    if path.is_dir():
        raise ConfigError(f"{key}={value} is a directory; give a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{key}={value} is not writable by this user")
        return
    _existing_ancestor(key, value, path.parent)
