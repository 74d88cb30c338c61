"""Ascend runtime settings, applied before torch_npu is imported (no torch import here).

torch >= 2.5 loads torch_npu as soon as `import torch` runs (device-backend autoload), and
torch_npu reads some of these when it starts, so `mtrain/__init__.py` applies them first thing.
A value the user already exported is kept.
"""

from __future__ import annotations

import os

NPU_DEFAULTS = {
    "TASK_QUEUE_ENABLE": "2",  # level-2 task queue: host dispatch overlaps device execution
    "CPU_AFFINITY_CONF": "1",  # bind each process's threads to cores near its NPU
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",  # less fragmentation at long sequences
    "HCCL_CONNECT_TIMEOUT": "1800",  # s to build communicators: large jobs start slowly
    "HCCL_EXEC_TIMEOUT": "3600",  # s a collective may wait, e.g. for rank 0 writing a checkpoint
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # megatron's TP overlap needs in-order kernel queues
}


APPLIED: dict[str, str] = {}  # the defaults this process set (the rest came from the user)


def apply_npu_defaults(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set each default the user has not set; returns the ones applied."""
    env = os.environ if environ is None else environ
    applied = {k: v for k, v in NPU_DEFAULTS.items() if k not in env}
    env.update(applied)
    if environ is None:
        APPLIED.update(applied)
    return applied
