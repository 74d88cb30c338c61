"""Workarounds for megatron-core 0.12.x (seen on 0.12.1 and 0.12.3, the versions MindSpeed's
`core_r0.12.1` branches pin). See the package docstring for how to retire one."""

from __future__ import annotations

from collections.abc import Callable
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
    steps = [
        (state, state.pop("step"))
        for opt in inner
        for state in opt.optimizer.state.values()
        if "step" in state
    ]
    read = load or torch.load
    try:
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
    finally:
        for state, step in steps:
            state["step"] = step.clone()


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
