"""Mixture of experts in megatron-core: the TransformerConfig fields and the per-layer block spec
of an MoE model (dense and MoE layers mixed as the model says).

The router is HF Qwen3-MoE's: a softmax over all experts, the top-k kept, renormalised when
`moe_norm_topk_prob` (megatron's softmax over the top-k logits is the same numbers); without
renormalisation megatron's `moe_router_pre_softmax`. Tokens go to their experts' EP ranks through
the all-to-all dispatcher, dropless unless `moe.capacity_factor` is set; experts are megatron-core's
SequentialMLP, whose checkpoint names the converters read and write, or with `moe.grouped_gemm`
its GroupedMLP (one grouped GEMM per rank's experts), which presents the same names
(mtrain/models/experts.py).
"""

from __future__ import annotations

import copy
from typing import Any

from mtrain import compat
from mtrain.config.moe import MoeConfig
from mtrain.models.spec import ModelSpec


def moe_transformer_fields(
    spec: ModelSpec, ep: int, etp: int | None, tp: int, moe: MoeConfig
) -> dict[str, Any]:
    """TransformerConfig fields of an MoE model ({} for a dense one)."""
    if not spec.is_moe:
        return {}
    return dict(
        num_moe_experts=spec.num_experts,
        moe_router_topk=spec.moe_router_topk,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not spec.moe_norm_topk_prob,
        moe_layer_freq=spec.moe_layer_pattern(),
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coef > 0 else "none",
        moe_aux_loss_coeff=compat.per_token_router_loss_coeff(moe.aux_loss_coef, tp),
        moe_z_loss_coeff=compat.per_token_router_loss_coeff(moe.z_loss_coef, tp) or None,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_router_dtype="fp32",  # HF computes the router softmax in fp32 too
        moe_grouped_gemm=moe.grouped_gemm,
        expert_model_parallel_size=ep,
        # megatron-core 0.12's default is TP; spelt out so that a checkpoint's layout is known
        expert_tensor_parallel_size=etp or tp,
    )


def moe_block_spec(spec: ModelSpec, dense_layer: Any, config: Any):
    """The layer specs of this pipeline stage: `dense_layer` (any kernels' spec) where the model
    has a dense MLP; elsewhere the same layer with megatron-core's local MoE MLP (SequentialMLP,
    or GroupedMLP with `config.moe_grouped_gemm`) and a separate pre-MLP norm (a fused-norm spec
    folds that norm into a linear_fc1 the MoE layer lacks)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_block import (
        LayerNormImpl,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    moe_layer = copy.deepcopy(dense_layer)
    moe_layer.submodules.mlp = get_mlp_module_spec(
        use_te=False, num_experts=spec.num_experts, moe_grouped_gemm=config.moe_grouped_gemm
    )
    if moe_layer.submodules.pre_mlp_layernorm is IdentityOp:
        moe_layer.submodules.pre_mlp_layernorm = LayerNormImpl
    final_norm = LayerNormImpl  # as megatron builds the block of one layer spec
    if config.sequence_parallel:
        dense_layer = copy.deepcopy(dense_layer)
        final_norm = _sequence_parallel_norms([dense_layer, moe_layer], final_norm)
    pattern = spec.moe_layer_pattern()
    offset = get_transformer_layer_offset(config)
    layers = [moe_layer if pattern[i] else dense_layer for i in range(spec.num_layers)]
    return TransformerBlockSubmodules(
        layer_specs=layers[offset : offset + get_num_layers_to_build(config)],
        layer_norm=final_norm,
    )


def _sequence_parallel_norms(layers: list[Any], final_norm: Any) -> Any:
    """Swap megatron-core's torch norm, which refuses sequence parallelism, for mtrain's in the
    layer specs (in place); returns the final norm to use. Other kernels' norms are kept, and so
    is MindSpeed's, which takes the torch norm's place (its fused RMSNorm supports SP)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from mtrain.compat import SequenceParallelRMSNorm

    if not WrappedTorchNorm.__module__.startswith("megatron."):
        return final_norm

    for layer in layers:
        subs = layer.submodules
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            if getattr(subs, name) is WrappedTorchNorm:
                setattr(subs, name, SequenceParallelRMSNorm)
        attention = getattr(subs.self_attention, "submodules", None)
        for name in ("q_layernorm", "k_layernorm"):
            if getattr(attention, name, None) is WrappedTorchNorm:
                setattr(attention, name, SequenceParallelRMSNorm)
    return SequenceParallelRMSNorm if final_norm is WrappedTorchNorm else final_norm
