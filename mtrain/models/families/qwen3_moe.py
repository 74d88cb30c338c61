"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): the Qwen3 layer with its MLP replaced, in the
sparse layers, by a softmax router over all experts (top-k, optionally renormalised) and routed
SwiGLU experts; no shared expert. Dense layers (HF `mlp_only_layers`, `decoder_sparse_step`) keep
the Qwen3 MLP of width `intermediate_size`.

megatron-core names (local spec, SequentialMLP): `mlp.router.weight` and
`mlp.experts.local_experts.{j}.linear_fc1/linear_fc2.weight`, gate and up fused in fc1 as in the
dense MLP. HF names: `mlp.gate.weight` and `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`.
"""

from mtrain.models.families.base import EMBEDDING, FINAL_NORM, OUTPUT, Entry, Family, Kind
from mtrain.models.families.qwen3 import QWEN3

_MLP = ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight")

QWEN3_MOE = Family(
    name="qwen3_moe",
    hf_model_types=("qwen3_moe",),
    hf_architecture="Qwen3MoeForCausalLM",
    qkv_bias=False,
    qk_layernorm=True,
    layer=QWEN3.layer,
    embedding=EMBEDDING,
    final_norm=FINAL_NORM,
    output=OUTPUT,
    moe_layer=(
        *(e for e in QWEN3.layer if e.mcore not in _MLP),
        Entry("mlp.router.weight", ("mlp.gate.weight",), Kind.REPLICATED, (("experts", "hidden"),)),
    ),
    expert=(
        Entry(
            "linear_fc1.weight",
            ("gate_proj.weight", "up_proj.weight"),
            Kind.GATED_FC1,
            (("moe_ffn", "hidden"), ("moe_ffn", "hidden")),
        ),
        Entry("linear_fc2.weight", ("down_proj.weight",), Kind.ROW, (("hidden", "moe_ffn"),)),
    ),
    stacked_experts=(
        ("mlp.experts.gate_up_proj", ("gate_proj.weight", "up_proj.weight")),
        ("mlp.experts.down_proj", ("down_proj.weight",)),
    ),
)
