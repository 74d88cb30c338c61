"""Which layer implementation runs the model (`kernels=`), and the `npu` config group.

`kernels=auto` picks per device: the local megatron-core spec on CPU; Transformer Engine's spec on
CUDA when `transformer_engine` is installed, else the local spec with torch SDPA attention; on
Ascend, MindSpeed's fused kernels when MindSpeed is installed, else mtrain's own torch_npu spec.
Every choice keeps the local spec's checkpoint names, so checkpoints move between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KERNELS = ("auto", "local", "sdpa", "te", "torch_npu", "mindspeed")


@dataclass
class NpuConfig:
    flash_attn: bool = True  # npu_fusion_attention (MindSpeed --use-flash-attn)
    fused_rmsnorm: bool = True  # npu_rms_norm (MindSpeed --use-fused-rmsnorm)
    fused_swiglu: bool = True  # npu_swiglu (MindSpeed --use-fused-swiglu)
    fused_rope: bool = True  # npu_rotary_mul (MindSpeed --use-fused-rotary-pos-emb)
    mc2: bool = False  # fuse TP communication into the matmuls (--use-ascend-mc2); tp>1 + SP
    mindspeed_flags: list[str] = field(
        default_factory=list
    )  # more MindSpeed flags, passed as given (kernels=mindspeed only)
