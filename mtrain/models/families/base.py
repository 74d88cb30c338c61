"""The vocabulary of the family tables: how one Megatron tensor relates to its HF tensor(s), the
megatron-core switches a family needs, and which linears LoRA can adapt.

Everything numeric about a model (parameter counts, FLOPs, LoRA adapter sizes, shard shapes) is
derived from the tables' symbolic shapes, so a new family states its tensors once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

MCORE_LAYER_PREFIX = "decoder.layers.{i}."
HF_LAYER_PREFIX = "model.layers.{i}."
# One routed expert of an MoE layer, relative to the layer prefixes: megatron-core's
# SequentialMLP numbers the experts of its EP rank from 0 (j), HF numbers them globally (e).
MCORE_EXPERT_PREFIX = "mlp.experts.local_experts.{j}."
HF_EXPERT_PREFIX = "mlp.experts.{e}."

# (local-spec name, fused name) of the two pre-norms, relative to a decoder layer. Transformer
# Engine fuses each into the following linear under the second name, and megatron-core's
# distributed checkpoints (torch_dist) use that name whatever the layer spec.
FUSED_NORM_NAMES = (
    ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
)


class Kind(Enum):
    """How a tensor is laid out across tensor-parallel ranks (see mtrain/models/sharding.py)."""

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
    # Shape of each HF tensor in symbols of `ModelSpec.shape_symbols()`: hidden, ffn, vocab,
    # q (= heads * head_dim), kv (= kv groups * head_dim), head (= head_dim), labels (= 1, a
    # reward model's outputs); for MoE models also experts (routed experts per layer) and
    # moe_ffn (one expert's MLP width).
    shapes: tuple[tuple[str, ...], ...]

    def numel(self, symbols: dict[str, int]) -> int:
        """Elements of all its HF tensors."""
        return sum(math.prod(symbols[s] for s in shape) for shape in self.shapes)

    @property
    def is_matmul(self) -> bool:
        """A linear layer's weight (2-D), as opposed to a norm weight or a bias."""
        return all(len(shape) == 2 for shape in self.shapes) and self.mcore.endswith(".weight")

    def matrix(self, symbols: dict[str, int]) -> tuple[int, int]:
        """(out features, in features) of a linear entry, its HF tensors stacked."""
        return sum(symbols[shape[0]] for shape in self.shapes), symbols[self.shapes[0][1]]


# The linears LoRA can adapt, by their megatron-core module names (the entries' names without
# `.weight`); HF splits two of them: linear_qkv is q/k/v_proj, linear_fc1 is gate/up_proj.
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


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
    # last pipeline stage of a reward model, in place of `output` (HF *ForSequenceClassification)
    score: Entry = field(default_factory=lambda: SCORE)

    @property
    def hf_reward_architecture(self) -> str:
        """config.json `architectures` of the family's reward model (a scalar `score` head)."""
        return self.hf_architecture.replace("ForCausalLM", "ForSequenceClassification")

    # Mixture of experts. An MoE layer has `moe_layer` (the dense layer without its MLP, plus the
    # router) and `expert` once per routed expert (names relative to the EXPERT prefixes).
    moe_layer: tuple[Entry, ...] = ()
    expert: tuple[Entry, ...] = ()
    # HF checkpoints that stack the experts of a layer into 3-D tensors (what transformers 5
    # holds in memory): stacked name (relative to the layer) -> the per-expert names it holds,
    # each an equal block of rows of one expert's slab.
    stacked_experts: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def transformer_switches(self) -> dict[str, Any]:
        """The megatron-core TransformerConfig fields this family fixes (the sizes come from
        the ModelSpec)."""
        import torch.nn.functional as F

        return dict(
            normalization="RMSNorm",
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            qk_layernorm=self.qk_layernorm,
        )

    @property
    def lora_targets(self) -> dict[str, Entry]:
        """LoRA target name -> the layer entry of the linear's weight (module path = the entry's
        name without `.weight`)."""
        by_module = {e.mcore.removesuffix(".weight").split(".")[-1]: e for e in self.layer}
        return {t: by_module[t] for t in LORA_TARGETS if t in by_module}

    def hf_lora_names(self) -> dict[str, str]:
        """HF module name (q_proj, ...) -> the LoRA target that fuses it."""
        return {
            hf.removesuffix(".weight").split(".")[-1]: target
            for target, entry in self.lora_targets.items()
            for hf in entry.hf
        }

    def layer_parameters(self, symbols: dict[str, int], moe: bool = False, experts=None) -> int:
        """Parameters of one layer: dense, or MoE with `experts` experts (default: all)."""
        if not moe:
            return sum(e.numel(symbols) for e in self.layer)
        experts = symbols["experts"] if experts is None else experts
        own = sum(e.numel(symbols) for e in self.moe_layer)
        return own + experts * sum(e.numel(symbols) for e in self.expert)

    def layer_matmul_parameters(self, symbols: dict[str, int], moe: bool = False, experts=None):
        """Matmul weights of one layer; for an MoE layer those a token goes through with
        `experts` active experts (the router included)."""
        if not moe:
            return sum(e.numel(symbols) for e in self.layer if e.is_matmul)
        own = sum(e.numel(symbols) for e in self.moe_layer if e.is_matmul)
        return own + experts * sum(e.numel(symbols) for e in self.expert if e.is_matmul)


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
# A reward model's scalar head: one output, so every TP rank holds all of it (the hidden
# states it reads are whole on every rank); HF's sequence-classification name.
SCORE = Entry("score.weight", ("score.weight",), Kind.REPLICATED, (("labels", "hidden"),))
