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
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

from mtrain import accel
from mtrain.checkpoint.args import megatron_args
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
    ("moe.grouped_gemm", "--moe-grouped-gemm"),
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
    "--context-parallel-size",
    "--context-parallel-algo",
)
OWNED = frozenset(flag for _, flag in SWITCHES) | frozenset(VALUE_FLAGS)
SPARSE_GIVEN_MASK = 0  # npu_fusion_attention applies the mask it is given

# TEST-ONLY. With this set to 1, `kernels=mindspeed` runs on device=cpu, so that mtrain's tests
# (tests/test_mindspeed.py) can run MindSpeed's own code on gloo under the torch_npu emulation in
# tests/npu_emulation. It is refused unless that emulation is the torch_npu on the path, so no
# real run can take it; a user never needs it.
CPU_TEST_SWITCH = "MTRAIN_TEST_ONLY_MINDSPEED_ON_CPU"

# Every MindSpeed branch for megatron-core 0.12.1 reports version 0.12.1, so the release is told
# by a file it added (and its later releases kept), newest first; verified against the
# Ascend/MindSpeed branches 2.1.0 .. 26.1.0_core_r0.12.1.
RELEASE_MARKERS: list[tuple[str, str]] = [
    ("26.1.0", "core/memory/swap_layer_input/__init__.py"),
    ("26.0.0", "core/dist_checkpointing/checkpoint_adaptor.py"),
    ("2.3.0", "core/distributed/reset_bucket_group_order_feature/__init__.py"),
    ("2.2.0", "core/fusions/fused_moe_permute.py"),
]
TESTED_RELEASE = "2.3.0"  # the branch mtrain's MindSpeed tests run (2.3.0_core_r0.12.1)


def emulated_on_cpu(device_name: str) -> bool:
    """Whether this is one of mtrain's test runs of MindSpeed on CPU (see CPU_TEST_SWITCH)."""
    if os.environ.get(CPU_TEST_SWITCH) != "1":
        return False
    emulation = False
    if device_name == "cpu" and importlib.util.find_spec("torch_npu") is not None:
        import torch_npu

        emulation = getattr(torch_npu, "EMULATION", False) and hasattr(torch, "npu")
    if not emulation:
        raise ConfigError(
            f"{CPU_TEST_SWITCH}=1 is for mtrain's own tests only: it runs MindSpeed on CPU "
            "under the test-only torch_npu emulation (tests/npu_emulation, with "
            f"TORCH_NPU_EMULATION_HOST=1), which this process does not have (device="
            f"{device_name}); unset {CPU_TEST_SWITCH}"
        )
    return True


def release(root: str | os.PathLike | None = None) -> str | None:
    """The MindSpeed release installed (e.g. '2.3.0'), read from its files; None if absent.

    `root`: the `mindspeed` package directory; found on the path when not given (without
    importing it: the import patches megatron-core)."""
    if root is None:
        spec = importlib.util.find_spec("mindspeed")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = list(spec.submodule_search_locations)[0]
    for name, marker in RELEASE_MARKERS:
        if (Path(root) / marker).is_file():
            return name
    return "2.1.0 or older"


def compile_disabled() -> bool:
    """MindSpeed's adaptor replaces torch.compile and torch.jit.script with no-ops, for the
    whole process; a run says so in its header."""
    return getattr(torch.compile, "__module__", "").startswith("mindspeed")


def describe() -> str:
    """What the run header says about MindSpeed."""
    out = f"MindSpeed {release()}"
    if compile_disabled():
        out += ", which made torch.compile / torch.jit.script no-ops"
    return out


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
    if kernels == "mindspeed" and plan.cp > 1 and getattr(cfg.data, "packing", False):
        raise ConfigError(
            "kernels=mindspeed with parallel.cp > 1 and data.packing=true is not supported: "
            "MindSpeed's CP takes packed rows in its own mask layout; use kernels=torch_npu "
            "(mtrain's Ulysses CP runs packed rows)"
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
    if plan.cp > 1:  # MindSpeed's own CP (parallel.cp, parallel.cp_algo)
        out += ["--context-parallel-size", str(plan.cp)]
        out += ["--context-parallel-algo", cfg.parallel.cp_algo]
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


def config_fields(cfg: Any, plan: Any) -> dict[str, Any]:
    """TransformerConfig fields MindSpeed's feature checks read from it. Its context-parallel
    validators (run in the config's __post_init__) test `seq_length`, which megatron-core's
    TransformerConfig lacks and which, as a command-line flag, MindSpeed would keep as a string;
    given as a config field it arrives as the integer (tests/test_mindspeed.py, CP tests)."""
    return {"seq_length": int(cfg.train.seq_length)} if plan.cp > 1 else {}


# Of a checkpoint's args (mtrain/checkpoint/args.py), those MindSpeed reads from get_args().
SHAPE_ARGS = (
    "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "num_layers", "hidden_size", "ffn_hidden_size",
    "num_attention_heads", "num_query_groups", "group_query_attention", "kv_channels",
    "qk_layernorm", "normalization", "swiglu", "position_embedding_type", "moe_router_topk",
    "moe_ffn_hidden_size",
)  # fmt: skip


def training_args(cfg: Any, plan: Any, spec: Any) -> dict[str, Any]:
    """Megatron-LM training arguments that MindSpeed's patched code reads from its `get_args()`.

    MindSpeed expects megatron.training to have parsed the whole Megatron-LM command line; mtrain
    runs on megatron-core alone, so MindSpeed's namespace holds only the flags its own features
    register, a flag it does not know arrives as a string ('2' for --context-parallel-size 2),
    and the rest are missing (its Ulysses and ring attention read `context_parallel_size`,
    `use_legacy_models`, `reset_position_ids`, ...). These are the run's values, typed as
    Megatron-LM types them; `install` puts them into that namespace."""
    tr, par = cfg.train, cfg.parallel
    vpp = plan.vpp if plan.vpp > 1 else None
    theta = float(spec.rope_theta)
    # The model's shape under Megatron-LM's names, as mtrain's checkpoints record it.
    recorded = vars(megatron_args(spec, plan.tp, plan.pp, plan.vpp, "float32", plan.ep))
    out = {name: recorded[name] for name in SHAPE_ARGS if name in recorded}
    out.update(
        num_layers_per_virtual_pipeline_stage=spec.num_layers // (plan.pp * vpp) if vpp else None,
        context_parallel_size=plan.cp,
        expert_model_parallel_size=plan.ep,
        expert_tensor_parallel_size=plan.etp,
        sequence_parallel=bool(par.sequence_parallel),
        use_distributed_optimizer=bool(par.distributed_optimizer),
        overlap_grad_reduce=bool(par.overlap_grad_reduce),
        overlap_param_gather=False,
        gradient_accumulation_fusion=False,
        seq_length=int(tr.seq_length),
        micro_batch_size=int(tr.micro_batch_size),
        global_batch_size=int(tr.global_batch_size),
        curr_iteration=0,
        apply_layernorm_1p=False,
        rotary_base=int(theta) if theta.is_integer() else theta,
        rope_scaling_type=None,
        use_flash_attn=bool(cfg.npu.flash_attn),
        use_legacy_models=False,
        reset_position_ids=False,
        reset_attention_mask=False,
        use_nd_matmul=False,
        bf16=tr.precision == "bf16",
        fp16=tr.precision == "fp16",
        recompute_granularity=None if tr.recompute == "none" else tr.recompute,
        recompute_method="uniform" if tr.recompute == "full" else None,
        recompute_num_layers=1 if tr.recompute == "full" else None,
        num_experts=spec.num_experts,
        moe_grouped_gemm=bool(cfg.moe.grouped_gemm),
    )
    return out


def prepare(chunk: torch.nn.Module, ops: Any, packed: bool) -> None:
    """What a chunk built under MindSpeed's patches still needs.

    - npu.fused_rmsnorm=false: MindSpeed's norm factory turns `use_fused_rmsnorm` on for every
      RMSNorm it builds (on the TransformerConfig they share), whatever the flag says; turn it
      off again once the chunk is built, so the norms take their unfused path.
    - Causal batches get their mask from the caller: with flash attention, the compressed
      causal mask of sparse mode 2 (see `flags`); without it, the full [s, s] causal mask
      (MindSpeed would otherwise build one from `micro_batch_size` / `pre_tockens` config
      fields that megatron-core's TransformerConfig does not have, and fail).
    """
    if not ops.fused_rmsnorm:
        for module in chunk.modules():
            if _is_mindspeed_rmsnorm(module):
                module.config.use_fused_rmsnorm = False
    if packed:
        return

    def with_causal_mask(module, args, kwargs):
        if len(args) < 3 and kwargs.get("attention_mask") is None:
            if ops.flash_attn:
                kwargs["attention_mask"] = compressed_causal_mask(accel.device())
            else:
                kwargs["attention_mask"] = _full_causal_mask(args, kwargs)
        return args, kwargs

    chunk.register_forward_pre_hook(with_causal_mask, with_kwargs=True)


def _is_mindspeed_rmsnorm(module: torch.nn.Module) -> bool:
    return (
        type(module).__module__.startswith("mindspeed.")
        and hasattr(module, "unfused_rmsnorm")
        and hasattr(getattr(module, "config", None), "use_fused_rmsnorm")
    )


def _full_causal_mask(args: tuple, kwargs: dict) -> torch.Tensor:
    """[1, 1, s, s] bool, True above the diagonal (masked out); s from the tokens or positions
    (GPTModel.forward(input_ids, position_ids, ...))."""
    given = [*args, kwargs.get("input_ids"), kwargs.get("position_ids")]
    seq = next(t.shape[-1] for t in given if isinstance(t, torch.Tensor))
    ones = torch.ones(seq, seq, dtype=torch.bool, device=accel.device())
    return torch.triu(ones, diagonal=1)[None, None]


def install(argv_flags: list[str], typed: dict[str, Any]) -> None:
    """Import MindSpeed's megatron adaptor with `argv_flags` as the command line, then restore it;
    `typed` (see `training_args`) then replaces what MindSpeed parsed for those names."""
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
    namespace = importlib.import_module("mindspeed.args_utils").get_mindspeed_args()
    for name, value in typed.items():
        setattr(namespace, name, value)
