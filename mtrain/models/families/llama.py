"""Llama 3 / 3.1 / 3.2: the plain decoder layer, no biases, no q/k norms."""

from mtrain.models.families.base import EMBEDDING, FINAL_NORM, OUTPUT, Family, llama_like_layer

LLAMA = Family(
    name="llama",
    hf_model_types=("llama",),
    hf_architecture="LlamaForCausalLM",
    qkv_bias=False,
    qk_layernorm=False,
    layer=llama_like_layer(),
    embedding=EMBEDDING,
    final_norm=FINAL_NORM,
    output=OUTPUT,
)
