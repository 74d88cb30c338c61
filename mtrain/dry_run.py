"""`dry_run=true`: validate a training config, check its output locations and print the layout,
the compute and the memory estimate per device (mtrain/estimates.py), without starting a process
group or building the model."""

from __future__ import annotations

import os

from mtrain.config.schema import TrainingCommandConfig, resolve_layout, validate
from mtrain.estimates import GiB, checkpoint_bytes, device_memory, fits, memory_estimate
from mtrain.preflight import check_outputs
from mtrain.progress import flops_per_token


def count(value: float, unit: str = "") -> str:
    """1234567 -> "1.23 M", 3.3e10 -> "32.76 B" (with `unit`: "1.23 MFLOP")."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value / 1e3:.2f} K{unit}" if value >= 1e3 else f"{value:.0f} {unit}".rstrip()


def size(gib: float) -> str:
    """A size in GiB, shown in MiB when under one GiB."""
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def describe_plan(cfg: TrainingCommandConfig) -> str:
    """The human-readable plan; raises ConfigError on an invalid config."""
    tp, pp = resolve_layout(cfg)
    world = int(os.environ.get("WORLD_SIZE", tp * pp))
    spec = cfg.model.spec()
    plan = validate(cfg, world, spec)
    check_outputs(cfg, spec)
    tr = cfg.train
    mem = memory_estimate(cfg, plan, spec)
    total = sum(mem[k] for k in ("weights", "gradients", "optimizer", "activations"))
    tokens = tr.global_batch_size * tr.seq_length
    lines = [
        f"model      {cfg.model.display_name}: {count(spec.num_parameters())} parameters"
        + (f" ({count(spec.num_parameters(active=True))} active per token)" if spec.is_moe else "")
        + ", "
        f"{spec.num_layers} layers, hidden {spec.hidden_size}, heads {spec.num_attention_heads}"
        f"/{spec.num_query_groups}, vocab {spec.vocab_size}",
        f"layout     {plan.describe()}",
        f"batch      {tr.global_batch_size} x {tr.seq_length} tokens = {tokens:,} per step, "
        f"{plan.micro_batches} micro-batches of {tr.micro_batch_size} per DP rank"
        + (
            " (packed rows: each holds several samples; the run's start-up line says how many)"
            if getattr(cfg.data, "packing", False)
            else ""
        ),
        f"compute    {count(flops_per_token(spec, tr.seq_length) * tokens, 'FLOP')} per step",
        f"memory     per device (busiest stage, estimate): {size(total)} = weights "
        f"{size(mem['weights'])} + grads {size(mem['gradients'])} + optimizer "
        f"{size(mem['optimizer'])} + activations {size(mem['activations'])} "
        f"({tr.recompute or 'no'} recompute, {count(mem['parameters'])} parameters on the device"
        + (
            f", {count(mem['trained'])} of them LoRA adapters (r={cfg.lora.r})"
            if cfg.finetuning_type == "lora"
            else ""
        )
        + ")",
        *_moe_lines(spec, plan, mem),
        f"checkpoint {size(checkpoint_bytes(cfg, spec) / GiB)} per save (weights + optimizer"
        + (", adapters only" if cfg.finetuning_type == "lora" else "")
        + ")",
    ]
    device_gib = device_memory(cfg)
    if device_gib is not None:
        lines.append(fit_line(total, device_gib, plan.cp, tr.recompute))
    return "\n".join(lines)


def fit_line(total: float, device_gib: float, cp: int, recompute: str | None) -> str:
    """Whether the estimate fits the device, and what to change when it does not."""
    if fits(total, device_gib):
        return f"fit        yes: {size(total)} of {size(device_gib)} per device"
    hints = [f"raise parallel.cp (now {cp})"]
    if recompute != "full":
        hints.append("train.recompute=full")
    return (
        f"fit        NO: {size(total)} exceeds 90% of {size(device_gib)} per device "
        f"(device_memory_gib); {' or '.join(hints)}, or lower train.micro_batch_size"
    )


def _moe_lines(spec, plan, mem: dict) -> list[str]:
    """The experts' line of an MoE model's plan."""
    if not spec.is_moe:
        return []
    etp = plan.etp or plan.tp
    return [
        f"experts    {spec.num_experts} per MoE layer, top-{spec.moe_router_topk}; "
        f"{spec.num_experts // plan.ep} per EP rank (ep {plan.ep}, etp {etp}): "
        f"{count(mem['experts'])} expert parameters per device; all-to-all buffers "
        f"{size(mem['dispatcher'])} per layer in flight"
    ]
