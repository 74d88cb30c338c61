"""Before any compute is spent: can the run write everything it will write?

Every output location of a training command is checked up front, on every rank (nodes may see
different filesystems): `save` (a directory that exists or can be created, writable, with room
for one more checkpoint, estimated from the model and the precision), `log.metrics_file` (a file
that can be created or appended to) and `log.tensorboard_dir`. Nothing is created here.
"""

from __future__ import annotations

from mtrain.config.schema import TrainingCommandConfig
from mtrain.estimates import checkpoint_bytes
from mtrain.models.spec import ModelSpec
from mtrain.paths import check_directory, check_file


def check_outputs(cfg: TrainingCommandConfig, spec: ModelSpec) -> None:
    if cfg.save is not None:
        check_directory("save", cfg.save, checkpoint_bytes(cfg, spec))
    if cfg.log.metrics_file is not None:
        check_file("log.metrics_file", cfg.log.metrics_file)
    if cfg.log.tensorboard_dir is not None:
        check_directory("log.tensorboard_dir", cfg.log.tensorboard_dir)
