"""Qwen2 / Qwen2.5: the Llama layer plus a bias on q, k and v (fused like the weights)."""

from mtrain.models.families.base import (
    EMBEDDING,
    FINAL_NORM,
    OUTPUT,
    Entry,
    Family,
    Kind,
    llama_like_layer,
)

QWEN2 = Family(
    name="qwen2",
    hf_model_types=("qwen2",),
    hf_architecture="Qwen2ForCausalLM",
    qkv_bias=True,
    qk_layernorm=False,
    layer=llama_like_layer(
        Entry(
            "self_attention.linear_qkv.bias",
            ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
            Kind.QKV,
            (("q",), ("kv",), ("kv",)),
        ),
    ),
    embedding=EMBEDDING,
    final_norm=FINAL_NORM,
    output=OUTPUT,
)
