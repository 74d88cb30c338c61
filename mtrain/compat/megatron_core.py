"""Workarounds for megatron-core 0.12.x (seen on 0.12.1 and 0.12.3, the versions MindSpeed's
`core_r0.12.1` branches pin). See the package docstring for how to retire one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def batch_p2p_comm(pp: int) -> bool:
    """Whether the pipeline schedule may batch its point-to-point sends.

    Symptom (0.12.x, gloo): with PP=2 both pipeline neighbours are the same rank, and batched
    p2p sends activations and gradients to it over one group, where they can be matched to the
    wrong receive; the interleaved schedule then trains on swapped tensors. The unbatched path
    uses one group per direction. Shown by tests/test_train.py::
    test_interleaved_schedule_gives_the_same_loss_curve."""
    return pp != 2


def keep_frozen_tied_embedding_reducible(chunks: list[torch.nn.Module]) -> None:
    """Give a frozen tied embedding a zero `main_grad`.

    Symptom (0.12.x): `finalize_model_grads` all-reduces the tied embedding's `main_grad`
    between the first and last pipeline stages without checking that it is trained; a frozen
    one has no such buffer (AttributeError at the first step). Shown by tests/test_train.py::
    test_freeze_trains_only_the_named_parameters and the LoRA runs at PP=2 (tests/test_lora.py)."""
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        if not module.share_embeddings_and_output_weights:
            continue
        if not (module.pre_process or module.post_process):
            continue
        weight = module.shared_embedding_or_output_weight()
        if weight is not None and not weight.requires_grad and not hasattr(weight, "main_grad"):
            weight.main_grad = torch.zeros_like(weight, dtype=torch.float32)


def load_distributed_optimizer_state(
    optimizer: Any, path: str, load: Callable[[str], Any] | None = None
) -> None:
    """`optimizer.load_parameter_state(path)` for the distributed optimizer on torch's Adam,
    reading the file with `load` (mtrain's safe loader) instead of megatron's bare `torch.load`.

    Three symptoms (0.12.x without Apex / Transformer Engine): megatron reads the file with
    `torch.load(filename)`, which unpickles anything on torch < 2.6; `load_state_dict` gives every
    parameter's state the *same* "step" tensor, which Adam then increments in place once per
    parameter (a wrong bias correction from the first resumed step); and the DP-zero loader
    expects a saved tensor for every state key, "step" included (KeyError). So the file is read
    here (on DP rank 0, in megatron's own layout: one state, or a list with one per chained
    optimizer), the steps are set aside while loading, and each parameter gets its own copy back.
    Shown by tests/test_train.py::test_interrupted_and_resumed_training_reproduces_the_loss_sequence
    (distributed optimizer on)."""
    inner = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    read = load or torch.load
    with _steps_set_aside(inner):
        states = None
        for index, opt in enumerate(inner):
            if getattr(opt, "is_stub_optimizer", False) or not hasattr(
                opt, "load_parameter_state_from_dp_zero"
            ):
                continue
            if torch.distributed.get_rank(opt.data_parallel_group) == 0 and states is None:
                states = read(path)
            state = None if states is None else states if len(inner) == 1 else states[index]
            opt.load_parameter_state_from_dp_zero(state)


@contextmanager
def _steps_set_aside(optimizers: list[Any]) -> Iterator[None]:
    """Take Adam's "step" out of every parameter state of `optimizers` (megatron's loaders
    would copy into it, or need it saved), and give each parameter its own copy back after."""
    inner = [getattr(opt, "optimizer", None) for opt in optimizers]
    states = [s for opt in inner if opt is not None for s in opt.state.values()]
    steps = [(s, s.pop("step")) for s in states if isinstance(s.get("step"), torch.Tensor)]
    try:
        yield
    finally:
        for state, step in steps:
            state["step"] = step.clone()


def optimizer_state_for_dist_load(optimizer: Any) -> None:
    """Give a fresh optimizer the zero state a torch_dist load overwrites in place.

    Symptom (0.12.x without Apex / Transformer Engine): `sharded_state_dict(is_loading=True)` of
    the distributed optimizer first calls its own `state_dict()`, which collects Adam's "step"
    from the (still empty) state and fails `assert len(steps) == 1`. Every parameter of the inner
    optimizers now gets torch Adam's initial state (step 0, zero moments) first; the load then
    replaces the values. Shown by tests/test_torch_dist.py."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or len(inner.state) > 0:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(param),
                    "exp_avg_sq": torch.zeros_like(param),
                }


def load_dist_optimizer_state(optimizer: Any, state_dict: Any) -> None:
    """`optimizer.load_state_dict(state_dict)` for a state dict read from a torch_dist checkpoint.

    Symptoms (0.12.x without Apex / Transformer Engine), as for the legacy file
    (load_distributed_optimizer_state): the distributed optimizer gives every parameter's Adam
    state the *same* "step" tensor, which Adam then increments once per parameter (a wrong bias
    correction from the first resumed step); and its model-space loader copies every state key,
    "step" included, from the loaded state, which has none (KeyError: 'step'). So the parameter
    state is loaded here with the steps set aside, and each parameter gets its own copy back.
    Shown by tests/test_torch_dist.py."""
    chained = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    if len(chained) == 1:
        pairs = [(chained[0], state_dict)]
    else:
        pairs = list(zip(chained, (v for _, v in sorted(state_dict.items()))))
    for opt, state in pairs:
        param_state = None
        if isinstance(state, dict) and state.get("param_state_sharding_type") == (
            "fully_sharded_model_space"
        ):
            state = dict(state)
            param_state = state.pop("param_state")
            state.pop("param_state_sharding_type")
        opt.load_state_dict(state)
        with _steps_set_aside([opt]):
            if param_state is not None:
                opt.load_parameter_state_from_fs_model_space(param_state)


def mark_tensor_parallel_weights(chunks: list[torch.nn.Module]) -> None:
    """Give the weights of a model built with `perform_initialization=False` the
    tensor-parallel attributes an initialised build gives them.

    Symptom (0.12.x): megatron's VocabParallelEmbedding, ColumnParallelLinear and
    RowParallelLinear set `tensor_model_parallel` / `partition_dim` / `partition_stride` on their
    weight only inside the init helpers, which `perform_initialization=False` skips. Without them
    every sharded weight counts as a replicated duplicate: the gradient norm (and so clipping)
    sees only TP rank 0's shard, and TP2 training drifts from TP1 from the first clipped step.
    Shown by tests/test_odd_vocab.py and tests/test_any_model.py (hf_load_parity)."""
    from megatron.core.tensor_parallel import layers

    dims = (
        (layers.VocabParallelEmbedding, 0),
        (layers.ColumnParallelLinear, 0),
        (layers.RowParallelLinear, 1),
    )
    for chunk in chunks:
        for module in chunk.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.nn.Parameter) or hasattr(
                weight, "tensor_model_parallel"
            ):
                continue
            for cls, dim in dims:
                if isinstance(module, cls):
                    layers.set_tensor_model_parallel_attributes(weight, True, dim, 1)
                    break


def tolerate_empty_fp8_quantization() -> None:
    """Let megatron's no-Transformer-Engine FP8 fallback accept an empty parameter list.

    Symptom (0.12.x): the distributed optimizer's `_copy_main_params_to_model_params` calls
    `quantize_param_shard()` on every step, and without Transformer Engine (always on CPU, and
    on CUDA without TE) the fallback raises even when there are no FP8 parameters, so every
    distributed-optimizer step fails. It now raises only when there is something to quantize.
    Shown by every tests/test_train.py run (they use parallel.distributed_optimizer=true)."""
    from megatron.core import fp8_utils

    if fp8_utils.HAVE_TE or getattr(fp8_utils, "_mtrain_tolerant", False):
        return
    fallback = fp8_utils._quantize_param_shard_impl

    def quantize_param_shard_impl(model_params, *args: Any, **kwargs: Any) -> None:
        if len(model_params) > 0:
            fallback(model_params, *args, **kwargs)

    fp8_utils._quantize_param_shard_impl = quantize_param_shard_impl
    fp8_utils._mtrain_tolerant = True


def tolerate_numpy2_in_dist_checkpointing() -> None:
    """Give megatron's dist_checkpointing modules the `np.product` numpy 2 removed.

    Symptom (0.12.x with numpy >= 2): saving a distributed checkpoint with the distributed
    optimizer fails in the sharding validation with "module 'numpy' has no attribute
    'product'" (also used by its ShardedTensor masks and shard exchange). Those three modules now
    see a numpy whose `product` is `prod`; numpy itself is left alone. Shown by
    tests/test_torch_dist.py."""
    import numpy

    if hasattr(numpy, "product"):
        return
    from megatron.core.dist_checkpointing import exchange_utils, mapping, validation

    class NumpyWithProduct:
        product = staticmethod(numpy.prod)

        def __getattr__(self, name: str) -> Any:
            return getattr(numpy, name)

    for module in (exchange_utils, mapping, validation):
        if module.np is numpy:
            module.np = NumpyWithProduct()


def pass_dcp_serialization_format() -> None:
    """Let megatron's torch_dist writer call torch >= 2.7's `_write_item`.

    Symptom (0.12.x with torch 2.7+): every `dist_checkpointing.save` fails in the writer with
    "_write_item() missing 1 required positional argument: 'serialization_format'", because
    torch added that argument (no default) and megatron-core's `FileSystemWriterAsync` calls it
    the old way. The call now gets torch's own default format (torch.save streams), which is what
    torch's `FileSystemReader` expects. Shown by tests/test_torch_dist.py."""
    import inspect

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    write_item = filesystem_async._write_item
    if getattr(write_item, "_mtrain_format", False):
        return
    parameter = inspect.signature(write_item).parameters.get("serialization_format")
    if parameter is None or parameter.default is not inspect.Parameter.empty:
        return
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    def write_item_with_format(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("serialization_format", SerializationFormat.TORCH_SAVE)
        return write_item(*args, **kwargs)

    write_item_with_format._mtrain_format = True
    filesystem_async._write_item = write_item_with_format


def count_loss_tokens_over_context_parallel(
    num_tokens: torch.Tensor, cp_group: Any
) -> torch.Tensor:
    """A micro-batch's loss-token count summed over the context-parallel group.

    Symptom (0.12.x): with `calculate_per_token_loss`, `finalize_model_grads` all-reduces the
    token count over the data-parallel group without CP, while the gradients are summed over
    data x context parallel: each CP rank would divide the same summed gradient by the count of
    its own chunks only, and the CP ranks' weights would drift apart from the first step. With the
    count summed over CP here, every rank divides by the global batch's count. Shown by
    tests/test_context_parallel.py (CP2 gradients equal CP1's)."""
    if torch.distributed.get_world_size(cp_group) == 1:
        return num_tokens
    total = num_tokens.clone()
    torch.distributed.all_reduce(total, group=cp_group)
    return total


class SequenceParallelRMSNorm(torch.nn.Module):
    """RMSNorm for the local spec under sequence parallelism. Symptom: megatron-core 0.12's torch
    norm (WrappedTorchNorm) asserts `not config.sequence_parallel`, yet its MoE refuses expert
    parallelism with TP unless SP is on. Same parameter name (`weight`) and numbers as
    torch.nn.RMSNorm; the weight is marked so megatron all-reduces its gradient over TP."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def forget_embedding_ranks() -> None:
    """After `destroy_model_parallel`, megatron-core 0.12 keeps the global rank lists of the
    (position) embedding groups, while the next `initialize_model_parallel` sets them only on
    ranks in the new groups. Symptom: a process that trains at PP=1 and then at PP=2 asserts
    "position embedding group is not initialized" in finalize_model_grads on the last stage
    (tests/test_moe_training.py and tests/test_context_parallel.py run several layouts in one
    torchrun)."""
    from megatron.core import parallel_state

    parallel_state._EMBEDDING_GLOBAL_RANKS = None
    parallel_state._POSITION_EMBEDDING_GLOBAL_RANKS = None


def per_token_router_loss_coeff(coeff: float, tp: int) -> float:
    """The `moe_aux_loss_coeff` / `moe_z_loss_coeff` that give the router losses their intended
    weight. megatron-core 0.12 with `calculate_per_token_loss` scales each rank's router loss by
    its own token count, but under sequence parallelism that loss is a share of one taken over
    the tokens of all TP ranks (the aux loss normalises by them; the z-loss divides its
    coefficient by TP), so the router-loss gradients come out 1/TP of TP=1's. Symptom: training
    curves with moe.aux_loss_coef or moe.z_loss_coef > 0 differ between TP=2 and TP=1 from the
    first step's gradient norm (tests/test_moe_training.py). The logged values divide the
    coefficients out, so they are unaffected. (MoE with context parallelism is refused: unverified.)"""
    return coeff * tp


def weigh_router_losses_per_loss_unit(
    output: torch.Tensor, units: torch.Tensor, tokens: int, config: Any
) -> None:
    """Make the router losses (load balancing and z-loss) of the micro-batch whose forward gave
    `output` weigh as one more term of a task that counts `units` loss units (loss tokens, pairs,
    samples) among its `tokens` routed tokens.

    Symptom (0.12.x, `calculate_per_token_loss`): the router multiplies each micro-batch's router
    losses by the tokens it routed, counting on the step's loss being normalised by those same
    tokens; a task that counts anything else weighs them (routed tokens / loss units) times more:
    2 x seq_length for a DPO pair (the router losses then dominate DPO, reward-model and KTO
    gradients), and prompt and padding tokens over response tokens in SFT. Their gradients are
    scaled by MoEAuxLossAutoScaler's backward scale, which the schedule sets to the loss scale
    after every forward; a hook on `output` sets it to the loss scale x units / tokens as this
    micro-batch's backward starts (before any of its layers, recomputed ones included, which
    add their router losses only then). The objective is then (sum of losses + coeff x sum of
    micro-batch router losses x their units) / all units: the router losses weigh as much per loss
    unit in every task, and as before for pretraining rows without padding (weight 1). Shown by
    tests/test_moe_training.py::test_dpo_gradient_with_router_losses_equals_plain_pytorch."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    if not output.requires_grad:
        return
    one = torch.ones(1, device=output.device)
    loss_scale = config.grad_scale_func(one) if config.grad_scale_func is not None else one
    scale = loss_scale * (units.float() / tokens)
    output.register_hook(lambda grad: MoEAuxLossAutoScaler.set_loss_scale(scale))
