"""Before any compute is spent: can the run write everything it will write?

Every output location of a training command is checked up front, on every rank (nodes may see
different filesystems): `save` (a directory that exists or can be created, writable, with room
for one more checkpoint, estimated from the model and the precision), `log.metrics_file` (a file
that can be created or appended to) and `log.tensorboard_dir`. Nothing is created here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mtrain.config.schema import TrainingCommandConfig
from mtrain.errors import ConfigError
from mtrain.estimates import GiB, checkpoint_bytes
from mtrain.models.spec import ModelSpec


def _existing_ancestor(key: str, path: Path) -> Path:
    """The nearest part of `path` that exists; it must be a writable directory."""
    parent = next(p for p in (path, *path.parents) if p.exists())
    if not parent.is_dir():
        raise ConfigError(
            f"{key}={path}: {parent} is a file, so nothing can be created below it; "
            "choose another location"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{key}={path}: {parent} is not writable by this user; choose a writable location"
        )
    return parent


def check_directory(key: str, value: str, need_bytes: float = 0.0) -> None:
    """`value` is, or can become, a writable directory with `need_bytes` free."""
    path = Path(value).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={value} exists and is not a directory; choose a directory")
    base = _existing_ancestor(key, path)
    if need_bytes:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            raise ConfigError(
                f"{key}={value}: {free / GiB:.1f} GiB free on its filesystem, but one checkpoint "
                f"of this run takes about {need_bytes / GiB:.1f} GiB; free space or choose "
                "another location"
            )


def check_file(key: str, value: str) -> None:
    """`value` is a writable file, or one that can be created."""
    path = Path(value).expanduser().absolute()
    if path.is_dir():
        raise ConfigError(f"{key}={value} is a directory; give a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{key}={value} is not writable by this user")
        return
    _existing_ancestor(key, path.parent)


def check_outputs(cfg: TrainingCommandConfig, spec: ModelSpec) -> None:
    if cfg.save is not None:
        check_directory("save", cfg.save, checkpoint_bytes(cfg, spec))
    if cfg.log.metrics_file is not None:
        check_file("log.metrics_file", cfg.log.metrics_file)
    if cfg.log.tensorboard_dir is not None:
        check_directory("log.tensorboard_dir", cfg.log.tensorboard_dir)
