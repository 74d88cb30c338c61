"""Checkpoints: the Megatron legacy format, and everything mtrain reads and writes in it.

    layout    file names, the tracker, reading a rank file safely, `MegatronCheckpoint`
    args      the `args` namespace every writer stores (Megatron-LM's argument names)
    adapters  what an adapter (LoRA) checkpoint records about its settings and its base
    weights   strict loading of model weights (adapters on their base)
    training  save/load of a run's named parts: model, optimizer, scheduler, RNG, data position
    start     the resume policy: `save`, else `load`, else a random init
    hf_io     streaming safetensors reads (slices) and writes; hf_weights: training from HF
    hf_export a checkpoint -> an HF model (merged LoRA or a PEFT adapter: peft), layer by layer
    unpickle  the allowlist unpickler for files torch's safe loader cannot read (any protocol)
    atomic    all-or-nothing writes (output directories, files), used by every writer

`from mtrain.checkpoint import X` works for the names below. They are imported on first use, so
that a light module (the data caches use `atomic`) does not pull in torch and the model code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "adapters": ["AdapterCheckpointInfo"],
    "args": ["megatron_args", "spec_from_megatron_args"],
    "atomic": ["atomic_output_dir", "atomic_paths", "atomic_write", "check_output_dir"],
    "layout": [
        "CHECKPOINT_VERSION",
        "RANK_FILE",
        "RELEASE",
        "TRACKER",
        "MegatronCheckpoint",
        "iteration_dir_name",
        "load_checkpoint_file",
        "load_rank_file",
        "parse_iteration",
        "rank_dir_name",
        "rank_file",
        "read_tracker",
        "save_rank_file",
        "write_tracker",
    ],
    "unpickle": ["load_restricted"],
    "start": ["GROUPED_GEMM_ARG", "check_start", "load_start_weights", "resume", "starting_point"],
    "hf_weights": ["check_hf_tensors", "is_hf_dir", "load_hf_weights"],
    "training": [
        "DISTRIB_OPTIM_FILE",
        "TrainState",
        "TrainingParts",
        "load_training_checkpoint",
        "save_training_checkpoint",
    ],
    "weights": ["load_model_weights"],
    "hf_export": ["export_hf", "export_run_checkpoint"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
