"""Qwen3 (dense): the Llama layer plus RMSNorm on each query and key head (q_norm, k_norm)."""

from mtrain.models.families.base import (
    EMBEDDING,
    FINAL_NORM,
    OUTPUT,
    Entry,
    Family,
    Kind,
    llama_like_layer,
)

QWEN3 = Family(
    name="qwen3",
    hf_model_types=("qwen3",),
    hf_architecture="Qwen3ForCausalLM",
    qkv_bias=False,
    qk_layernorm=True,
    layer=llama_like_layer(
        Entry(
            "self_attention.q_layernorm.weight",
            ("self_attn.q_norm.weight",),
            Kind.REPLICATED,
            (("head",),),
        ),
        Entry(
            "self_attention.k_layernorm.weight",
            ("self_attn.k_norm.weight",),
            Kind.REPLICATED,
            (("head",),),
        ),
    ),
    embedding=EMBEDDING,
    final_norm=FINAL_NORM,
    output=OUTPUT,
)
