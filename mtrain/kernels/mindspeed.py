"""MindSpeed start-up: mtrain's config as MindSpeed command-line flags, installed before megatron.

`import mindspeed.megatron_adaptor` patches megatron-core at import time and reads its feature
switches from `sys.argv` (MindSpeed parses known flags and keeps unknown `--key value` pairs as
strings). MindSpeed's TransformerConfig wrapper also copies every parsed flag onto each
TransformerConfig that megatron-core builds, which is how its flash attention learns
`sparse_mode`. So the flags are computed from the validated config, placed in `sys.argv` for the
import, and argv is restored afterwards; megatron must not have been imported yet.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch

from mtrain import accel
from mtrain.errors import ConfigError
from mtrain.kernels.torch_npu import SPARSE_TOP_LEFT_CAUSAL, compressed_causal_mask

# mtrain switch -> MindSpeed / Megatron-LM flag, emitted when the switch is true.
SWITCHES: list[tuple[str, str]] = [
    ("npu.flash_attn", "--use-flash-attn"),
    ("npu.fused_rmsnorm", "--use-fused-rmsnorm"),
    ("npu.fused_swiglu", "--use-fused-swiglu"),
    ("npu.fused_rope", "--use-fused-rotary-pos-emb"),
    ("npu.mc2", "--use-ascend-mc2"),
    ("parallel.distributed_optimizer", "--use-distributed-optimizer"),
    ("parallel.sequence_parallel", "--sequence-parallel"),
    ("parallel.overlap_grad_reduce", "--overlap-grad-reduce"),
]

# Flags `flags` sets from the layout, the model and train.* (besides SWITCHES); a user's
# npu.mindspeed_flags may not repeat any of them.
VALUE_FLAGS = (
    "--tensor-model-parallel-size",
    "--pipeline-model-parallel-size",
    "--num-layers-per-virtual-pipeline-stage",
    "--normalization",
    "--swiglu",
    "--position-embedding-type",
    "--bf16",
    "--fp16",
    "--recompute-granularity",
    "--recompute-method",
    "--recompute-num-layers",
    "--sparse-mode",
)
OWNED = frozenset(flag for _, flag in SWITCHES) | frozenset(VALUE_FLAGS)
SPARSE_GIVEN_MASK = 0  # npu_fusion_attention applies the mask it is given


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check(cfg: Any, plan: Any, kernels: str) -> None:
    """Refuse NPU option combinations that MindSpeed or mtrain cannot run, naming the keys."""
    npu, par = cfg.npu, cfg.parallel
    if npu.mc2:
        if kernels != "mindspeed":
            raise ConfigError(
                f"npu.mc2=true needs kernels=mindspeed (kernels={kernels}); MC2 is a MindSpeed "
                "feature: install MindSpeed or set npu.mc2=false"
            )
        if plan.tp == 1 or not par.sequence_parallel:
            raise ConfigError(
                f"npu.mc2=true needs parallel.tp > 1 and parallel.sequence_parallel=true "
                f"(tp={plan.tp}, sequence_parallel={par.sequence_parallel}); "
                "MC2 fuses the sequence-parallel all-gather/reduce-scatter into the matmuls"
            )
        if cfg.finetuning_type == "lora":
            raise ConfigError(
                "npu.mc2=true with finetuning_type=lora is not supported: MC2 replaces the "
                "parallel linears that the adapters attach to; set npu.mc2=false"
            )
    if npu.mindspeed_flags and kernels != "mindspeed":
        raise ConfigError(
            f"npu.mindspeed_flags={list(npu.mindspeed_flags)} needs kernels=mindspeed "
            f"(kernels={kernels})"
        )
    for flag in npu.mindspeed_flags:
        if not flag.startswith("--"):
            raise ConfigError(
                f"npu.mindspeed_flags: {flag!r} is not a flag; give '--name' or '--name=value'"
            )
    for flag in npu.mindspeed_flags:
        if flag.split("=", 1)[0] in OWNED:
            raise ConfigError(
                f"npu.mindspeed_flags: {flag} is set from mtrain's own keys; use the key "
                f"instead (see the table in mtrain/kernels/mindspeed.py)"
            )


def flags(cfg: Any, plan: Any, num_layers: int, packed: bool) -> list[str]:
    """MindSpeed's argv for this run. `packed`: batches carry block-causal masks (packed SFT)."""
    out = [flag for key, flag in SWITCHES if _get(cfg, key)]
    tr = cfg.train
    out += [
        "--tensor-model-parallel-size",
        str(plan.tp),
        "--pipeline-model-parallel-size",
        str(plan.pp),
        # The model shape MindSpeed's validators check its fused kernels against.
        "--normalization",
        "RMSNorm",
        "--swiglu",
        "--position-embedding-type",
        "rope",
    ]
    if plan.vpp > 1:
        per_stage = num_layers // (plan.pp * plan.vpp)
        out += ["--num-layers-per-virtual-pipeline-stage", str(per_stage)]
    if tr.precision in ("bf16", "fp16"):
        out.append(f"--{tr.precision}")
    if tr.recompute == "full":
        out += ["--recompute-granularity", "full", "--recompute-method", "uniform"]
        out += ["--recompute-num-layers", "1"]
    elif tr.recompute == "selective":
        out += ["--recompute-granularity", "selective"]
    if cfg.npu.flash_attn:
        # Causal batches pass the compressed 2048x2048 mask (sparse mode 2); packed batches pass
        # their full block-causal mask, which the kernel applies as given (mode 0).
        out += ["--sparse-mode", str(SPARSE_GIVEN_MASK if packed else SPARSE_TOP_LEFT_CAUSAL)]
    return out + list(cfg.npu.mindspeed_flags)


def prepare(chunk: torch.nn.Module, ops: Any, packed: bool) -> None:
    """MindSpeed's flash attention runs sparse mode 2 on causal batches (see `flags`) and takes
    the compressed causal mask from the caller."""
    if not ops.flash_attn or packed:
        return

    def with_causal_mask(module, args, kwargs):
        if len(args) < 3 and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = compressed_causal_mask(accel.device())
        return args, kwargs

    chunk.register_forward_pre_hook(with_causal_mask, with_kwargs=True)


def install(argv_flags: list[str]) -> None:
    """Import MindSpeed's megatron adaptor with `argv_flags` as the command line, then restore it."""
    early = sorted(m for m in sys.modules if m == "megatron" or m.startswith("megatron."))
    if early:
        raise RuntimeError(
            f"megatron was imported before MindSpeed's adaptor ({early[0]}); MindSpeed must "
            "patch megatron-core first (mtrain.accel.activate runs before any megatron import)"
        )
    saved = sys.argv[:]
    sys.argv[:] = [saved[0] if saved else "mtrain", *argv_flags]
    try:
        importlib.import_module("mindspeed.megatron_adaptor")
    finally:
        sys.argv[:] = saved
