"""Process groups: torch.distributed from torchrun's environment, then megatron's parallel_state.

The one seam to megatron's `parallel_state`: the rest of mtrain asks this module for its ranks,
sizes and groups.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from mtrain import accel, compat
from mtrain.errors import MtrainError
from mtrain.plan import data_parallel_size

T = TypeVar("T")
CLUSTER_WAIT = datetime.timedelta(hours=24)  # how long `cluster_first` waits for another rank


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(
    tp: int = 1,
    pp: int = 1,
    vpp: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
    cp: int = 1,
    ep: int = 1,
    etp: int | None = None,
) -> int:
    """Join the job's process group and build megatron's TP/PP/CP/DP groups (and, for MoE, the
    expert groups: `ep` expert-parallel ranks of `etp`-way tensor-parallel experts, default
    `tp`); returns the DP size.

    Works under torchrun and as a single plain process (world size 1).
    """
    from megatron.core import parallel_state, tensor_parallel

    dp = data_parallel_size(tp, pp, world_size(), cp)
    init_process_group(timeout_minutes)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
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


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def cluster_first(step: Callable[[], T]) -> T:
    """Run `step`, a read that fills a cache on a miss (tokenizing data into `data.cache_dir`),
    on global rank 0 first, then on the first process of every other node, then on all the
    others: three turns, every rank waiting between them. With a cache directory that the nodes
    share (the usual cluster set-up) rank 0 alone fills it and every other rank reads it; with a
    node-local one, the first process of each other node finds no entry and fills its node's.
    An error in a turn stops every rank with the same message. The ranks wait on a CPU (gloo)
    group of their own, whose timeout (`CLUSTER_WAIT`) lets a big data set take hours where the
    device group's would end the job. Collective."""
    turn = 0 if global_rank() == 0 else 1 if local_rank() == 0 else 2
    group = dist.new_group(backend="gloo", timeout=CLUSTER_WAIT)
    result = None
    try:
        for phase in range(3):
            error = None
            if phase == turn:
                try:
                    result = step()
                except Exception as err:
                    error = err
            _stop_together(error, group)
    finally:
        dist.destroy_process_group(group)
    return result


def _stop_together(error: Exception | None, group) -> None:
    """A barrier that raises on every rank once `error` is set on any: there the error itself,
    elsewhere the same message (mtrain's own errors keep their type, so each rank reports the
    same line)."""
    flag = torch.tensor([global_rank() + 1 if error is not None else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    failed = int(flag.item()) - 1
    if failed < 0:
        return
    box = [None]
    if global_rank() == failed:
        box = [error if isinstance(error, MtrainError) else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(box, src=failed, group=group)
    if error is not None:
        raise error
    if isinstance(box[0], MtrainError):
        raise box[0]
    raise RuntimeError(f"global rank {failed} failed: {box[0]}")


def destroy() -> None:
    """Drop megatron's groups (the torch.distributed group stays, for another layout)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    compat.forget_embedding_ranks()


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


def cp_rank() -> int:
    return _state().get_context_parallel_rank()


def cp_size() -> int:
    return _state().get_context_parallel_world_size()


def cp_group():
    return _state().get_context_parallel_group()


# The ranks that hold the same weights (data x context parallel): megatron reduces gradients
# and shards the distributed optimizer over them; one of them writes a checkpoint file.


def replica_rank() -> int:
    return _state().get_data_parallel_rank(with_context_parallel=True)


def replica_size() -> int:
    return _state().get_data_parallel_world_size(with_context_parallel=True)


def replica_group():
    return _state().get_data_parallel_group(with_context_parallel=True)


def ep_rank() -> int:
    return _state().get_expert_model_parallel_rank()


def ep_size() -> int:
    return _state().get_expert_model_parallel_world_size()


def expert_dp_rank() -> int:
    """Rank among the processes that hold the same experts (megatron's expert DP group)."""
    return _state().get_expert_data_parallel_rank()


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
