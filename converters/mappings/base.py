"""The vocabulary of the mapping tables: how one Megatron tensor relates to its HF tensor(s)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

MCORE_LAYER_PREFIX = "decoder.layers.{i}."
HF_LAYER_PREFIX = "model.layers.{i}."


class Kind(Enum):
    """How a tensor is laid out across tensor-parallel ranks (see converters/layout.py)."""

    REPLICATED = "replicated"  # every rank holds the whole tensor (norms)
    COLUMN = "column"  # split along dim 0 (output features)
    ROW = "row"  # split along dim 1 (input features)
    QKV = "qkv"  # q, k, v fused per kv group, then split along dim 0
    GATED_FC1 = "gated_fc1"  # gate and up, each split along dim 0, fused per rank
    VOCAB = "vocab"  # rows padded with zeros to the padded vocab, then split along dim 0


@dataclass(frozen=True)
class Entry:
    """One Megatron tensor and the HF tensor(s) it is made of.

    Names of layer entries are relative to `MCORE_LAYER_PREFIX` / `HF_LAYER_PREFIX`.
    """

    mcore: str
    hf: tuple[str, ...]
    kind: Kind
    # Shape of each HF tensor in symbols of `dims_of` (converters/layout.py): hidden, ffn, vocab,
    # q (= heads * head_dim), kv (= kv groups * head_dim), head (= head_dim).
    shapes: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Family:
    """Everything mtrain knows about one architecture family, as data."""

    name: str
    hf_model_types: tuple[str, ...]  # HF config.json `model_type` values this family reads
    hf_architecture: str  # written to config.json `architectures`
    qkv_bias: bool
    qk_layernorm: bool
    layer: tuple[Entry, ...]
    embedding: Entry  # first pipeline stage
    final_norm: Entry  # last pipeline stage
    output: Entry  # last pipeline stage; with tied embeddings it is a copy of `embedding`


def llama_like_layer(*extra: Entry) -> tuple[Entry, ...]:
    """The decoder layer shared by Llama, Qwen2 and Qwen3, plus family-specific entries."""
    return (
        Entry(
            "input_layernorm.weight", ("input_layernorm.weight",), Kind.REPLICATED, (("hidden",),)
        ),
        Entry(
            "self_attention.linear_qkv.weight",
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            Kind.QKV,
            (("q", "hidden"), ("kv", "hidden"), ("kv", "hidden")),
        ),
        Entry(
            "self_attention.linear_proj.weight",
            ("self_attn.o_proj.weight",),
            Kind.ROW,
            (("hidden", "q"),),
        ),
        Entry(
            "pre_mlp_layernorm.weight",
            ("post_attention_layernorm.weight",),
            Kind.REPLICATED,
            (("hidden",),),
        ),
        Entry(
            "mlp.linear_fc1.weight",
            ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
            Kind.GATED_FC1,
            (("ffn", "hidden"), ("ffn", "hidden")),
        ),
        Entry("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), Kind.ROW, (("hidden", "ffn"),)),
        *extra,
    )


EMBEDDING = Entry(
    "embedding.word_embeddings.weight",
    ("model.embed_tokens.weight",),
    Kind.VOCAB,
    (("vocab", "hidden"),),
)
FINAL_NORM = Entry(
    "decoder.final_layernorm.weight", ("model.norm.weight",), Kind.REPLICATED, (("hidden",),)
)
OUTPUT = Entry("output_layer.weight", ("lm_head.weight",), Kind.VOCAB, (("vocab", "hidden"),))
