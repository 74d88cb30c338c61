"""The CPU shim's part for megatron-core's MoE token dispatcher (see cpu.py): its collectives
as gloo takes them."""

from __future__ import annotations

import functools

import torch


def patch_megatron_moe() -> None:
    """The all-to-all token dispatcher hands its split sizes to all_to_all_single as numpy
    arrays, made where it moves them off the GPU (moe_utils.maybe_move_tensor_to_cpu); a
    CPU tensor is left a tensor, which gloo's all_to_all_single refuses. Convert it the same."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def move(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = move
    token_dispatcher.maybe_move_tensor_to_cpu = move
    _patch_uneven_sequence_collectives()


def _patch_uneven_sequence_collectives() -> None:
    """With expert tensor parallelism the dispatcher gathers (and reduce-scatters) a different
    number of tokens per TP rank; gloo's all_gather / reduce_scatter take equal sizes only.
    Uneven calls become a padded all-gather and an all-reduce, with the same results."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_uneven(input_, group=None, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or dist.get_world_size(group) == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
        padded[: len(input_)] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def scatter_uneven(input_, group=None, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or dist.get_world_size(group) == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        sizes = [int(n) for n in input_split_sizes]
        return total.split(sizes)[dist.get_rank(group)].clone()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = scatter_uneven
