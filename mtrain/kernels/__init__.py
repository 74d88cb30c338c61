"""Which layers run the model, per `kernels=` value (mtrain/config/kernels.py).

`CHOICES` says what each value means: its layer spec, megatron-core's own fusion switches, whether
its norm supports sequence parallelism, how packed batches reach attention, what a built chunk
still needs, and what it refuses. The model builder asks only the functions below. The device
backends (mtrain/accel) know nothing of this package; `start` puts the two together for a
training command.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mtrain import accel
from mtrain.config.kernels import KERNELS
from mtrain.errors import ConfigError
from mtrain.kernels import mindspeed, sdpa, te, torch_npu, ulysses

log = logging.getLogger("mtrain.kernels")


def _never(ops: Any) -> bool:
    return False


@dataclass(frozen=True)
class Kernels:
    """What one `kernels=` choice means to the model builder."""

    # (qk_layernorm, packed, ops, config) -> the layer or block spec; None: the local spec
    # (mindspeed patches the local spec's modules itself).
    layer_spec: Callable[[bool, bool, Any, Any], Any] | None = None
    # megatron's jit-fused SwiGLU / bias-dropout and softmax (CUDA; on Ascend MindSpeed
    # redirects them to NPU kernels); mtrain's torch_npu spec and the CPU run plain PyTorch.
    megatron_fused: bool = False
    fused_rope: bool = False  # megatron's fused RoPE, where Transformer Engine or MindSpeed has one
    # npu.fused_swiglu switches megatron's bias-activation fusion, where the fused SwiGLU is
    # reached through it (MindSpeed patches megatron's SwiGLU functions whatever its flags say).
    swiglu_switch: bool = False
    sequence_parallel: bool = False  # its norm supports it (megatron-core's torch RMSNorm does not)
    # (ops) -> packed batches hand attention their cu_seqlens boundaries, not a dense mask.
    cu_seqlens: Callable[[Any], bool] = _never
    prepare: Callable[[torch.nn.Module, Any, bool], None] | None = None  # (chunk, ops, packed)
    check: Callable[[Any], None] | None = None  # (ops): refuse `npu.*` switches it cannot run
    device: str | None = None  # the device it needs, if one
    package: str | None = None  # the package it needs, if one
    # Why this machine cannot run it; formatted with the device and whether the package is found.
    unavailable: str = ""
    # Runs context parallelism itself (megatron-core's with TE, MindSpeed's own); else mtrain
    # wraps its core attention in Ulysses all-to-alls (mtrain/kernels/ulysses.py).
    own_context_parallel: bool = False


CHOICES: dict[str, Kernels] = {
    "local": Kernels(),
    "sdpa": Kernels(layer_spec=sdpa.layer_spec, megatron_fused=True),
    "te": Kernels(
        layer_spec=te.layer_spec,
        megatron_fused=True,
        fused_rope=True,
        sequence_parallel=True,
        prepare=te.prepare,
        own_context_parallel=True,
        device="cuda",
        package="transformer_engine",
        unavailable="kernels=te needs device=cuda with transformer_engine installed (device="
        "{device}); use kernels=auto",
    ),
    "torch_npu": Kernels(
        layer_spec=torch_npu.layer_spec,
        sequence_parallel=True,
        cu_seqlens=torch_npu.takes_cu_seqlens,
        check=torch_npu.check,
        package="torch_npu",
        unavailable="kernels=torch_npu needs torch_npu installed; use kernels=auto",
    ),
    "mindspeed": Kernels(
        megatron_fused=True,
        fused_rope=True,
        swiglu_switch=True,
        sequence_parallel=True,
        prepare=mindspeed.prepare,
        own_context_parallel=True,
        device="npu",
        package="mindspeed",
        unavailable="kernels=mindspeed needs device=npu with MindSpeed installed (device={device}"
        ", MindSpeed {found}); see the README's 'Ascend NPU' section, or use kernels=torch_npu",
    ),
}

# kernels=auto on each device: the first choice this machine runs, else the last.
AUTO: dict[str, tuple[str, ...]] = {
    "cpu": ("local",),
    "cuda": ("te", "sdpa"),
    "npu": ("mindspeed", "torch_npu"),
}


def choice(kernels: str) -> Kernels:
    if kernels not in CHOICES:
        raise ConfigError(f"kernels={kernels} is not one of {', '.join(KERNELS)}")
    return CHOICES[kernels]


def _runs_here(kernels: Kernels, device_name: str) -> bool:
    on_device = kernels.device in (None, device_name)
    if kernels is CHOICES["mindspeed"] and not on_device:
        on_device = mindspeed.emulated_on_cpu(device_name)  # mtrain's own tests only
    return on_device and (kernels.package is None or accel.installed(kernels.package))


def resolve_kernels(requested: str, device_name: str) -> str:
    """The layer implementation `kernels=requested` stands for on `device_name`; refuse one
    this machine cannot run."""
    if requested == "auto":
        *preferred, fallback = AUTO[device_name]
        return next((k for k in preferred if _runs_here(CHOICES[k], device_name)), fallback)
    chosen = choice(requested)
    if not _runs_here(chosen, device_name):
        found = "found" if chosen.package and accel.installed(chosen.package) else "not found"
        raise ConfigError(chosen.unavailable.format(device=device_name, found=found))
    return requested


def for_finetuning(kernels: str, cfg: Any) -> str:
    """LoRA adapters need the unfused input norms, which Transformer Engine does not have."""
    if kernels != "te" or cfg.finetuning_type != "lora":
        return kernels
    if cfg.kernels == "te":
        raise ConfigError(
            "kernels=te with finetuning_type=lora: Transformer Engine fuses the input norm "
            "into linear_qkv / linear_fc1, so adapters there would see un-normalised inputs;"
            " use kernels=sdpa (what kernels=auto picks for LoRA on CUDA)"
        )
    log.info("kernels: sdpa, not te: LoRA adapters need the unfused input norms")
    return "sdpa"


def check(kernels: str, ops: Any, sequence_parallel: bool) -> None:
    chosen = choice(kernels)
    if sequence_parallel and not chosen.sequence_parallel:
        raise ConfigError(
            f"parallel.sequence_parallel=true needs a norm that supports it: kernels=te (CUDA) "
            f"or torch_npu / mindspeed (Ascend), not kernels={kernels} (megatron-core's torch "
            "RMSNorm refuses it)"
        )
    if chosen.check is not None:
        chosen.check(ops)


def start(cfg: Any, plan: Any, spec: Any) -> str:
    """Set up the device and kernels of a training command; returns the resolved `kernels`.

    Order matters on Ascend: torch_npu and its cuda->npu mapping, then MindSpeed's adaptor with
    the run's flags, all before the first megatron import. The backend runs the adaptor inside
    its set-up (on CPU, in mtrain's MindSpeed tests: between the shim's torch and megatron
    patches).
    """
    device_name = accel.resolve(cfg.device)
    kernels = for_finetuning(resolve_kernels(cfg.kernels, device_name), cfg)
    check(kernels, cfg.npu, cfg.parallel.sequence_parallel)
    if spec.is_moe and cfg.moe.grouped_gemm and kernels != "mindspeed":
        raise ConfigError(
            f"moe.grouped_gemm=true needs kernels=mindspeed (MindSpeed's GMM on Ascend), not "
            f"kernels={kernels}: megatron-core's own GroupedMLP needs the grouped_gemm CUDA "
            "package and Transformer Engine's grouped experts are not verified with mtrain; "
            "set moe.grouped_gemm=false (one matmul per expert)"
        )
    mindspeed.check(cfg, plan, kernels)
    adaptor = None
    if kernels == "mindspeed":
        packed = bool(getattr(cfg.data, "packing", False))
        argv = mindspeed.flags(cfg, plan, spec.num_layers, packed=packed)
        typed = mindspeed.training_args(cfg, plan, spec)

        def adaptor():
            mindspeed.install(argv, typed)

    accel.activate(device_name, before_megatron=adaptor)
    return kernels


def describe(kernels: str) -> str:
    """`kernels` as the run header names it."""
    return f"{kernels} ({mindspeed.describe()})" if kernels == "mindspeed" else kernels


def megatron_fusions(kernels: str, ops: Any) -> dict[str, bool]:
    """megatron-core's own fusion switches for these kernels (TransformerConfig fields)."""
    chosen = choice(kernels)
    return dict(
        bias_activation_fusion=chosen.megatron_fused
        and (ops.fused_swiglu or not chosen.swiglu_switch),
        masked_softmax_fusion=chosen.megatron_fused,
        bias_dropout_fusion=chosen.megatron_fused,
        apply_rope_fusion=chosen.fused_rope,
    )


def block_spec(kernels: str, qk_layernorm: bool, packed: bool, ops: Any, config: Any):
    """The layer (or block) spec for megatron's GPTModel; None means the local spec."""
    build = choice(kernels).layer_spec
    return None if build is None else build(qk_layernorm, packed, ops, config)


def context_parallel_spec(kernels: str, spec: Any) -> Any:
    """The layer spec under context parallelism: as it is where the kernels run CP themselves,
    else with Ulysses around its core attention."""
    return spec if choice(kernels).own_context_parallel else ulysses.wrap_layer_spec(spec)


def config_fields(kernels: str, cfg: Any, plan: Any) -> dict[str, Any]:
    """More TransformerConfig fields `kernels` needs (MindSpeed's checks read some from it)."""
    return mindspeed.config_fields(cfg, plan) if kernels == "mindspeed" else {}


def cu_seqlens_masks(kernels: str, ops: Any) -> bool:
    """Packed batches hand their cu_seqlens boundaries to attention instead of a dense mask."""
    return choice(kernels).cu_seqlens(ops)


def prepare(chunk: torch.nn.Module, kernels: str, ops: Any, packed: bool) -> None:
    """What a built GPTModel chunk still needs for these kernels."""
    ready = choice(kernels).prepare
    if ready is not None:
        ready(chunk, ops, packed)
