"""The `args` namespace of a Megatron checkpoint: the model shape and parallel layout.

Every writer (the trainer, converters.hf2mcore) builds it with `megatron_args`, so the two write
the same keys. The names are Megatron-LM's own: MindSpeed-LLM and Megatron-LM read the parallel
sizes and the model shape back from them (`spec_from_megatron_args` reads theirs too).
"""

from __future__ import annotations

import argparse
from typing import Any

from mtrain.errors import CheckpointError
from mtrain.models.families import FAMILIES
from mtrain.models.spec import ModelSpec

# How a checkpoint stores the routed experts of an MoE layer (recorded as `moe_grouped_gemm`):
# one module per expert (megatron-core's SequentialMLP), or all of an EP rank's experts in two
# tensors (GroupedMLP's weight1/weight2, what grouped-GEMM kernels train on).
EXPERT_LAYOUTS = ("sequential", "grouped")


def megatron_args(
    spec: ModelSpec,
    tp: int,
    pp: int,
    vpp: int,
    params_dtype: str,
    ep: int = 1,
    expert_layout: str = "sequential",
) -> argparse.Namespace:
    """The `args` stored in every rank file of a checkpoint of `spec` at this layout."""
    family = spec.family_table
    args = argparse.Namespace(
        model_type_hf=spec.family,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,  # 1 for dense models; MindSpeed-LLM's mg2hf needs the key
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        group_query_attention=spec.num_query_groups != spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        num_key_value_heads=spec.num_query_groups,  # the HF name MindSpeed-LLM's mg2hf reads
        kv_channels=spec.kv_channels,
        vocab_size=spec.vocab_size,
        padded_vocab_size=spec.padded_vocab_size(tp),
        max_position_embeddings=spec.max_position_embeddings,
        seq_length=spec.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope_theta,
        use_rope_scaling=spec.rope_scaling_factor is not None,
        rope_scaling_factor=spec.rope_scaling_factor or 8.0,
        normalization="RMSNorm",
        norm_epsilon=spec.norm_epsilon,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=family.qkv_bias,
        qk_layernorm=family.qk_layernorm,
        untie_embeddings_and_output_weights=not spec.tie_word_embeddings,
        transformer_impl="local",
        params_dtype=params_dtype,
        bf16=params_dtype == "bfloat16",
        fp16=params_dtype == "float16",
    )
    if vpp > 1:
        args.num_layers_per_virtual_pipeline_stage = spec.num_layers // (pp * vpp)
    if spec.is_moe:
        vars(args).update(
            num_experts=spec.num_experts,
            moe_router_topk=spec.moe_router_topk,
            moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
            moe_router_pre_softmax=not spec.moe_norm_topk_prob,
            norm_topk_prob=spec.moe_norm_topk_prob,  # MindSpeed-LLM's name
            moe_layer_freq=spec.moe_layer_pattern(),
            expert_tensor_parallel_size=tp,
            moe_grouped_gemm=expert_layout == "grouped",
        )
    return args


def expert_layout_of(args: argparse.Namespace) -> str:
    return "grouped" if getattr(args, "moe_grouped_gemm", False) else "sequential"


def _moe_from_args(a: dict[str, Any], layers: int, source: str) -> dict[str, Any]:
    """The MoE fields of a spec, from Megatron-LM's (or MindSpeed-LLM's) argument names."""
    if not a.get("num_experts"):
        return {}
    freq = a.get("moe_layer_freq", 1)
    if isinstance(freq, str):  # Megatron-LM's command line takes "[1,0,...]" too
        freq = [int(x) for x in freq.strip("[]").split(",") if x.strip()]
    pattern = freq if isinstance(freq, list) else [int(i % int(freq) == 0) for i in range(layers)]
    first_dense = int(a.get("first_k_dense_replace") or 0)  # MindSpeed-LLM's
    if len(pattern) != layers:
        raise CheckpointError(f"{source}: moe_layer_freq has {len(pattern)} layers, not {layers}")
    norm = a.get("norm_topk_prob")
    return dict(
        num_experts=int(a["num_experts"]),
        moe_router_topk=int(a.get("moe_router_topk") or 2),
        moe_ffn_hidden_size=int(a.get("moe_ffn_hidden_size") or a["ffn_hidden_size"]),
        moe_norm_topk_prob=bool(norm) if norm is not None else not a.get("moe_router_pre_softmax"),
        moe_dense_layers=tuple(i for i, m in enumerate(pattern) if not m or i < first_dense),
    )


def spec_from_megatron_args(args: argparse.Namespace, source: str) -> ModelSpec:
    """Inverse of `megatron_args`; also reads checkpoints written by MindSpeed-LLM/Megatron-LM.
    MindSpeed-LLM's hf2mg (convert_ckpt_v2) copies the HF config.json into `args` and adds only
    some of Megatron-LM's names: the FFN size and the GQA groups fall back to config.json's."""
    a = vars(args)

    def get(*keys: str) -> Any:
        return next((a[k] for k in keys if a.get(k) is not None), None)

    def need(*keys: str) -> Any:
        if get(*keys) is None:
            raise CheckpointError(f"{source}: checkpoint args lack {keys[0]!r}")
        return get(*keys)

    family = a.get("model_type_hf")
    if family not in FAMILIES:  # a foreign checkpoint: infer the family from its switches
        family = "qwen3" if a.get("qk_layernorm") else "qwen2" if a.get("add_qkv_bias") else "llama"
        family = "qwen3_moe" if family == "qwen3" and a.get("num_experts") else family
    layers = int(need("num_layers"))
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    # MindSpeed-LLM's hf2mg writes group_query_attention=False for GQA models too
    gqa = a.get("group_query_attention", True)
    groups = get("num_query_groups") if gqa else get("num_key_value_heads")
    return ModelSpec(
        family=family,
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=int(need("ffn_hidden_size", "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(groups or heads),
        kv_channels=int(a.get("kv_channels") or hidden // heads),
        vocab_size=int(a.get("vocab_size") or need("padded_vocab_size")),
        max_position_embeddings=int(a.get("max_position_embeddings") or 4096),
        rope_theta=float(a.get("rotary_base") or 10000.0),
        norm_epsilon=float(a.get("norm_epsilon") or 1e-6),
        tie_word_embeddings=not a.get("untie_embeddings_and_output_weights", True),
        rope_scaling_factor=a.get("rope_scaling_factor") if a.get("use_rope_scaling") else None,
        **_moe_from_args(a, layers, source),
    ).validate(source)
