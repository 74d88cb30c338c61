"""ModelSpec -> megatron-core `TransformerConfig`, layer spec and `GPTModel` chunks.

This is one of the few seams that touch megatron-core internals: a newer megatron-core or a
MindSpeed layer spec changes this file, not its callers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mtrain import compat, kernels
from mtrain.config.kernels import NpuConfig
from mtrain.config.moe import MoeConfig
from mtrain.dtypes import DTYPES
from mtrain.models.experts import present_sequential_names
from mtrain.models.moe import moe_block_spec, moe_transformer_fields
from mtrain.models.spec import ModelSpec


@dataclass
class BuildOptions:
    """How to build the model: precision, parallel layout and kernel choices."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1  # expert-parallel size (MoE)
    etp: int | None = None  # expert tensor-parallel size (MoE); None = tp, megatron's default
    moe: MoeConfig = field(default_factory=MoeConfig)  # routing and balancing (MoE)
    precision: str = "fp32"  # bf16 | fp16 | fp32
    sequence_parallel: bool = False
    cp: int = 1  # context-parallel size (mtrain/context_parallel.py)
    recompute_granularity: str | None = None  # None | selective | full
    recompute_num_layers: int | None = None
    init_method_std: float = 0.02
    seed_init_on_cpu: bool = True  # deterministic init independent of TP (use_cpu_initialization)
    # False: leave the weights as allocated, for a load that fills every one of them next (the
    # CPU init builds each whole weight in fp32 first: 1.2 GB for a 151936 x 2048 embedding).
    # LoRA adapters are not megatron's: they keep their own init either way.
    initialize: bool = True
    # Batches carry their own attention mask (packed samples): the layers must apply it rather
    # than the implicit causal one (megatron's fused causal softmax ignores a given mask).
    explicit_attention_mask: bool = False
    head: str = "lm"  # lm | score: a reward model's scalar head (mtrain/models/score.py)
    kernels: str = "local"  # resolved `kernels` (mtrain/config/kernels.py): which layers to build
    npu: NpuConfig = field(default_factory=NpuConfig)  # fused-kernel switches (torch_npu/mindspeed)
    extra: dict[str, Any] = field(default_factory=dict)  # more TransformerConfig fields

    @property
    def cu_seqlens_masks(self) -> bool:
        """Packed batches give attention their cu_seqlens, not a dense [s, s] mask."""
        return kernels.cu_seqlens_masks(self.kernels, self.npu)


def transformer_config(spec: ModelSpec, opts: BuildOptions):
    from megatron.core.transformer import TransformerConfig

    family = spec.family_table
    dtype = DTYPES[opts.precision]
    recompute: dict[str, Any] = {}
    if opts.recompute_granularity == "full":
        recompute = dict(
            recompute_granularity="full",
            recompute_method="uniform",
            recompute_num_layers=opts.recompute_num_layers or 1,
        )
    elif opts.recompute_granularity == "selective":
        recompute = dict(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels,
        layernorm_epsilon=spec.norm_epsilon,
        **family.transformer_switches(),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=opts.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=opts.precision == "bf16",
        fp16=opts.precision == "fp16",
        tensor_model_parallel_size=opts.tp,
        pipeline_model_parallel_size=opts.pp,
        virtual_pipeline_model_parallel_size=opts.vpp if opts.vpp > 1 else None,
        # MoE with TP: megatron-core needs SP for EP, and its aux loss counts tokens as SP splits
        sequence_parallel=opts.sequence_parallel or (spec.is_moe and opts.tp > 1),
        context_parallel_size=opts.cp,
        # Transformer Engine's CP (kernels=te): ring attention, megatron-core's default.
        cp_comm_type="p2p" if opts.cp > 1 else None,
        use_cpu_initialization=opts.seed_init_on_cpu,
        perform_initialization=opts.initialize,
        **kernels.megatron_fusions(opts.kernels, opts.npu),
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        batch_p2p_comm=compat.batch_p2p_comm(opts.pp),
        **recompute,
        **moe_transformer_fields(spec, opts.ep, opts.etp, opts.tp, opts.moe),
        **opts.extra,
    )


def layer_spec(spec: ModelSpec, opts: BuildOptions, config: Any):
    """The layers for `opts.kernels`; every choice keeps the local spec's checkpoint names."""
    qk = spec.family_table.qk_layernorm
    chosen = kernels.block_spec(opts.kernels, qk, opts.explicit_attention_mask, opts.npu, config)
    layer = chosen if chosen is not None else local_layer_spec(spec, opts.explicit_attention_mask)
    if opts.cp > 1:
        layer = kernels.context_parallel_spec(opts.kernels, layer)
    return moe_block_spec(spec, layer, config) if spec.is_moe else layer


def local_layer_spec(spec: ModelSpec, explicit_attention_mask: bool = False):
    """megatron-core's local (no Transformer Engine) layer spec; checkpoint names follow it."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    lspec = get_gpt_layer_local_spec(
        qk_layernorm=spec.family_table.qk_layernorm, normalization="RMSNorm"
    )
    if explicit_attention_mask:
        # RoPE still sees positions 0..s-1 of the packed row, which is exact: its scores depend
        # only on the distance between tokens, the same within a packed sample as alone.
        lspec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.padding
    return lspec


def build_model_chunks(spec: ModelSpec, opts: BuildOptions) -> list[torch.nn.Module]:
    """The GPTModel chunk(s) of this pipeline rank: one, or `vpp` with the interleaved schedule.

    Needs megatron's parallel_state to be initialised with the same tp/pp/vpp.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(spec, opts)
    chunks = []
    for chunk in range(opts.vpp):
        if opts.vpp > 1:
            parallel_state.set_virtual_pipeline_model_parallel_rank(chunk)
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(spec, opts, config),
            vocab_size=spec.padded_vocab_size(opts.tp),
            max_sequence_length=spec.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            parallel_output=True,
            share_embeddings_and_output_weights=spec.tie_word_embeddings and opts.head == "lm",
            position_embedding_type="rope",
            rotary_base=spec.rope_theta,
            rope_scaling=spec.rope_scaling_factor is not None,
            rope_scaling_factor=spec.rope_scaling_factor or 8.0,
        )
        kernels.prepare(model, opts.kernels, opts.npu, opts.explicit_attention_mask)
        if config.moe_grouped_gemm:
            present_sequential_names(model)
        if not opts.initialize:
            compat.mark_tensor_parallel_weights([model])
        if model.post_process and opts.head == "score":
            from mtrain.models.score import attach_score_head

            attach_score_head(model, opts.init_method_std)
        elif model.post_process:
            mask_padded_vocabulary(model, spec, opts.tp)
        chunks.append(model)
    if opts.vpp > 1:
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return chunks


def mask_padded_vocabulary(model: torch.nn.Module, spec: ModelSpec, tp: int) -> None:
    """Give the logits of the rows that only pad the vocabulary to a multiple of TP the value
    -inf, on the ranks that hold such rows.

    Without it a padded row (zero from hf2mcore, random from scratch) is an extra class in every
    softmax: the loss at TP=2 on a vocabulary of 301 differs from TP=1 by exactly the NLL with
    one zero logit added, and the row then trains. Masked, every loss, log-prob, accuracy and
    evaluation sees only the real vocabulary, whatever TP is, and the padded rows get no
    gradient. The hook sits on the output layer, so every path that produces logits is covered.
    """
    from megatron.core import parallel_state

    padded = spec.padded_vocab_size(tp)
    if padded == spec.vocab_size:
        return
    per_rank = padded // tp
    first = parallel_state.get_tensor_model_parallel_rank() * per_rank
    pad = torch.arange(first, first + per_rank) >= spec.vocab_size
    if not pad.any():
        return
    # A buffer moves with the model to its device; non-persistent, so checkpoints never see it.
    model.output_layer.register_buffer("vocab_padding", pad, persistent=False)

    def mask_logits(module, args, output):
        logits, bias = output
        return logits.masked_fill(module.vocab_padding, float("-inf")), bias

    model.output_layer.register_forward_hook(mask_logits)


def sharded_state_dicts(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """megatron-core's sharded state dict of each chunk, under the names Megatron-LM saves them
    with (`model`, or `model0`, `model1`, ... with virtual stages); each chunk's layers get their
    global numbers, so the virtual stage is set while its dict is built."""
    from megatron.core import parallel_state

    unwrapped = [getattr(c, "module", c) for c in chunks]
    if len(unwrapped) == 1:
        return {"model": unwrapped[0].sharded_state_dict()}
    states = {}
    for i, chunk in enumerate(unwrapped):
        parallel_state.set_virtual_pipeline_model_parallel_rank(i)
        states[f"model{i}"] = chunk.sharded_state_dict()
    parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return states
