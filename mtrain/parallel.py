"""Process groups: torch.distributed from torchrun's environment, then megatron's parallel_state.

The one seam to megatron's `parallel_state`: the rest of mtrain asks this module for its ranks,
sizes and groups.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from mtrain import accel
from mtrain.plan import data_parallel_size


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(
    tp: int = 1, pp: int = 1, vpp: int = 1, seed: int = 1234, timeout_minutes: int = 30
) -> int:
    """Join the job's process group and build megatron's TP/PP/DP groups; returns the DP size.

    Works under torchrun and as a single plain process (world size 1).
    """
    from megatron.core import parallel_state, tensor_parallel

    dp = data_parallel_size(tp, pp, world_size())
    init_process_group(timeout_minutes)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
    )
    # Seeds the default and the tensor-parallel RNG streams (different per TP rank, as megatron).
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return dp


def init_process_group(timeout_minutes: int = 30) -> None:
    """Join the job's torch.distributed group (idempotent); a plain process is a group of one."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # a plain `python -m ...` run
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group(
        accel.dist_backend(), timeout=datetime.timedelta(minutes=timeout_minutes)
    )


def node_first(step):
    """Run `step` (e.g. tokenizing a corpus into a shared cache) on one process per node first;
    the others run it after a barrier, when everything they need is cached. Collective."""
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    result = step() if first else None
    dist.barrier()
    return result if first else step()


def destroy() -> None:
    """Drop megatron's groups (the torch.distributed group stays, for another layout)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    """Leave megatron's groups and the torch.distributed group (end of a command)."""
    destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


# --- where this rank sits (after `init`) -----------------------------------------------------


def _state():
    from megatron.core import parallel_state

    return parallel_state


def tp_rank() -> int:
    return _state().get_tensor_model_parallel_rank()


def tp_size() -> int:
    return _state().get_tensor_model_parallel_world_size()


def tp_group():
    return _state().get_tensor_model_parallel_group()


def pp_rank() -> int:
    return _state().get_pipeline_model_parallel_rank()


def pp_size() -> int:
    return _state().get_pipeline_model_parallel_world_size()


def pp_group():
    return _state().get_pipeline_model_parallel_group()


def dp_rank() -> int:
    return _state().get_data_parallel_rank()


def dp_size() -> int:
    return _state().get_data_parallel_world_size()


def dp_group():
    return _state().get_data_parallel_group()


def is_last_stage() -> bool:
    """This rank holds the last pipeline stage (whatever its virtual chunk)."""
    return _state().is_pipeline_last_stage(ignore_virtual=True)


def rng_tracker_states() -> dict[str, torch.Tensor]:
    """megatron's named RNG streams (the tensor-parallel one, ...) of this rank."""
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker().get_states()


def set_rng_tracker_states(states: dict[str, torch.Tensor]) -> None:
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().set_states(states)
