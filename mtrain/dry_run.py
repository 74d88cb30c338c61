"""`dry_run=true`: validate a training config, check its output locations and print the layout,
the compute and the memory estimate per device (mtrain/estimates.py), without starting a process
group or building the model."""

from __future__ import annotations

import os

from mtrain.config.schema import TrainingCommandConfig, resolve_layout, validate
from mtrain.estimates import GiB, checkpoint_bytes, memory_estimate
from mtrain.preflight import check_outputs
from mtrain.progress import flops_per_token


def describe_plan(cfg: TrainingCommandConfig) -> str:
    """The human-readable plan; raises ConfigError on an invalid config."""
    tp, pp = resolve_layout(cfg)
    world = int(os.environ.get("WORLD_SIZE", tp * pp))
    spec = cfg.model.spec()
    plan = validate(cfg, world, spec)
    check_outputs(cfg, spec)
    tr = cfg.train
    mem = memory_estimate(cfg, plan, spec)
    total = sum(v for k, v in mem.items() if k not in ("parameters", "trained"))
    tokens = tr.global_batch_size * tr.seq_length
    lines = [
        f"model      {cfg.model.name}: {spec.num_parameters() / 1e9:.2f} B parameters, "
        f"{spec.num_layers} layers, hidden {spec.hidden_size}, heads {spec.num_attention_heads}"
        f"/{spec.num_query_groups}, vocab {spec.vocab_size}",
        f"layout     {plan.describe()}",
        f"batch      {tr.global_batch_size} x {tr.seq_length} tokens = {tokens:,} per step, "
        f"{plan.micro_batches} micro-batches of {tr.micro_batch_size} per DP rank",
        f"compute    {flops_per_token(spec, tr.seq_length) * tokens / 1e15:.2f} PFLOP per step",
        f"memory     per device (busiest stage, estimate): {total:.1f} GiB = weights "
        f"{mem['weights']:.1f} + grads {mem['gradients']:.1f} + optimizer {mem['optimizer']:.1f}"
        f" + activations {mem['activations']:.1f} ({tr.recompute or 'no'} recompute, "
        f"{mem['parameters'] / 1e9:.2f} B parameters on the device"
        + (
            f", {mem['trained'] / 1e6:.1f} M of them LoRA adapters (r={cfg.lora.r})"
            if cfg.finetuning_type == "lora"
            else ""
        )
        + ")",
        f"checkpoint {checkpoint_bytes(cfg, spec) / GiB:.1f} GiB per save (weights + optimizer"
        + (", adapters only" if cfg.finetuning_type == "lora" else "")
        + ")",
    ]
    return "\n".join(lines)
