"""The one place the model builder asks which layers to use, per resolved `kernels` value
(mtrain/config/kernels.py): the block spec, what a packed batch's attention mask looks like, and
what a built model chunk still needs."""

from __future__ import annotations

import math
from typing import Any

import torch

from mtrain.errors import ConfigError

# kernels whose norm supports sequence parallelism (megatron-core's torch RMSNorm does not).
SEQUENCE_PARALLEL = ("te", "torch_npu", "mindspeed")


class CoreAttention(torch.nn.Module):
    """Base of mtrain's core-attention modules: the constructor megatron-core's SelfAttention
    builds its `core_attention` with, and the attention's dropout and softmax scale."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
    ):
        super().__init__()
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    @staticmethod
    def refuse_unsupported(attention_bias: Any, packed_seq_params: Any) -> None:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("mtrain's attention takes neither attention_bias nor THD")


def check(kernels: str, ops: Any, sequence_parallel: bool) -> None:
    if sequence_parallel and kernels not in SEQUENCE_PARALLEL:
        raise ConfigError(
            f"parallel.sequence_parallel=true needs a norm that supports it: kernels=te (CUDA) "
            f"or torch_npu / mindspeed (Ascend), not kernels={kernels} (megatron-core's torch "
            "RMSNorm refuses it)"
        )
    if kernels == "torch_npu" and ops.fused_rope and not ops.flash_attn:
        raise ConfigError(
            "kernels=torch_npu: npu.fused_rope=true needs npu.flash_attn=true (the fused RoPE "
            "runs inside the flash attention module); set npu.fused_rope=false"
        )


def megatron_fusions(kernels: str) -> dict[str, bool]:
    """megatron-core's own fusion switches: its jit-fused SwiGLU / bias-dropout and softmax
    where they exist (CUDA; on Ascend MindSpeed redirects them to NPU kernels), and its fused
    RoPE where Transformer Engine or MindSpeed provides one. mtrain's torch_npu spec and the CPU
    run plain PyTorch."""
    fused = kernels in ("sdpa", "te", "mindspeed")
    return dict(
        bias_activation_fusion=fused,
        masked_softmax_fusion=fused,
        bias_dropout_fusion=fused,
        apply_rope_fusion=kernels in ("te", "mindspeed"),
    )


def block_spec(kernels: str, qk_layernorm: bool, packed: bool, ops: Any, config: Any):
    """The layer (or block) spec for megatron's GPTModel; None means the local spec."""
    if kernels == "sdpa":
        from mtrain.accel import sdpa

        return sdpa.layer_spec(qk_layernorm, packed)
    if kernels == "te":
        from mtrain.accel import te

        return te.layer_spec(qk_layernorm, packed)
    if kernels == "torch_npu":
        from mtrain.accel import npu_spec

        return npu_spec.layer_spec(qk_layernorm, ops, config)
    return None  # local; mindspeed patches the local spec's modules itself


def cu_seqlens_masks(kernels: str, ops: Any) -> bool:
    """Packed batches hand their cu_seqlens boundaries to attention instead of a dense mask."""
    return kernels == "torch_npu" and bool(ops.flash_attn)


def prepare(chunk: torch.nn.Module, kernels: str, ops: Any, packed: bool) -> None:
    """What a built GPTModel chunk still needs for these kernels."""
    if kernels == "te":
        from mtrain.accel import te

        te.present_local_names(chunk)
    if kernels == "mindspeed" and ops.flash_attn and not packed:
        # MindSpeed's flash attention runs sparse mode 2 and takes the compressed causal mask
        # from the caller (accel/mindspeed.py sets the mode).
        from mtrain import accel
        from mtrain.accel.npu_spec import compressed_causal_mask

        def with_causal_mask(module, args, kwargs):
            if len(args) < 3 and kwargs.get("attention_mask") is None:
                kwargs["attention_mask"] = compressed_causal_mask(accel.device())
            return args, kwargs

        chunk.register_forward_pre_hook(with_causal_mask, with_kwargs=True)
