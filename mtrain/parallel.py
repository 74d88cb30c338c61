"""Process groups: torch.distributed from torchrun's environment, then megatron's parallel_state."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from mtrain import accel
from mtrain.errors import ConfigError


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world(tp: int, pp: int, world: int | None = None) -> int:
    """The data-parallel size of `tp` x `pp` on `world` processes; refuse a layout that does not fit."""
    world = world_size() if world is None else world
    if world % (tp * pp):
        raise ConfigError(
            f"parallel.tp={tp} x parallel.pp={pp} = {tp * pp} does not divide the "
            f"{world} processes started; launch a multiple of {tp * pp} processes"
        )
    return world // (tp * pp)


def init(
    tp: int = 1, pp: int = 1, vpp: int = 1, seed: int = 1234, timeout_minutes: int = 30
) -> int:
    """Join the job's process group and build megatron's TP/PP/DP groups; returns the DP size.

    Works under torchrun and as a single plain process (world size 1).
    """
    from megatron.core import parallel_state, tensor_parallel

    dp = check_world(tp, pp)
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
