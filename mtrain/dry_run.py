"""`dry_run=true`: validate a training config and print the layout and a memory estimate per
device, without starting a process group or building the model.

The estimate is for the most loaded pipeline stage. Weights in the training precision; fp32
gradient buffers; Adam in fp32 (master weights + two moments), divided over DP with the
distributed optimizer. Activations per layer and micro-batch follow Korthikanti et al. (2022):
s*b*h*(34 + 5*a*s/h) bytes without recomputation (the 5as/h term is the attention matrix, absent
with flash attention), 34*s*b*h with selective and 2*s*b*h with full recomputation, divided by TP,
times the micro-batches the first 1F1B stage keeps in flight (min(pp, micro-batches)).
"""

from __future__ import annotations

import os

from mtrain.config.schema import TrainingCommandConfig, resolve_layout, validate
from mtrain.models.spec import ModelSpec
from mtrain.plan import ParallelPlan
from mtrain.progress import flops_per_token

GiB = 1024**3


def lora_parameters(cfg: TrainingCommandConfig, spec: ModelSpec, tp: int) -> float:
    """Adapter parameters per layer on one device (mtrain/lora.py's layout: the A of a
    column-parallel base and the B of a row-parallel one are replicated over TP)."""
    r = cfg.lora.r
    h, f, d = spec.hidden_size, spec.ffn_hidden_size, spec.kv_channels
    q, kv = spec.num_attention_heads * d, spec.num_query_groups * d
    shapes = {  # target: (in, out, column-parallel)
        "linear_qkv": (h, q + 2 * kv, True),
        "linear_proj": (q, h, False),
        "linear_fc1": (h, 2 * f, True),
        "linear_fc2": (f, h, False),
    }
    total = 0.0
    for target in cfg.lora.target_modules:
        n_in, n_out, column = shapes[target]
        total += r * (n_in + n_out / tp) if column else r * (n_in / tp + n_out)
    return total


def memory_estimate(
    cfg: TrainingCommandConfig, plan: ParallelPlan, spec: ModelSpec | None = None
) -> dict[str, float]:
    spec = cfg.model.spec() if spec is None else spec
    tp, pp, dp, tr = plan.tp, plan.pp, plan.dp, cfg.train
    h, f, d = spec.hidden_size, spec.ffn_hidden_size, spec.kv_channels
    q, kv = spec.num_attention_heads * d, spec.num_query_groups * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h
    layers = spec.num_layers // pp
    vocab = spec.padded_vocab_size(tp) * h
    first = layers * per_layer / tp + vocab / tp
    last = layers * per_layer / tp + (vocab / tp if (not spec.tie_word_embeddings or pp > 1) else 0)
    params = max(first, last) if pp > 1 else first + last - layers * per_layer / tp
    # Gradients and optimizer state exist for trained parameters only: with LoRA, the adapters.
    trained = lora_parameters(cfg, spec, tp) * layers if cfg.finetuning_type == "lora" else params
    weight_bytes = 4 if tr.precision == "fp32" else 2
    optimizer_bytes = (8 if tr.precision == "fp32" else 12) / (
        dp if cfg.parallel.distributed_optimizer else 1
    )
    # DPO: a sample is a pair (two sequences); a `model` reference of a full fine-tune is a
    # second copy of the weights (with LoRA it is the policy with its adapters off).
    dpo = getattr(cfg, "dpo", None)
    rows = 2 if dpo is not None else 1
    copies = (
        2 if dpo is not None and dpo.reference == "model" and cfg.finetuning_type != "lora" else 1
    )
    s, b, a = tr.seq_length, tr.micro_batch_size * rows, spec.num_attention_heads
    per_layer_act = {
        None: s * b * h * (34 + 5 * a * s / h),
        "selective": 34 * s * b * h,
        "full": 2 * s * b * h,
    }[tr.recompute]
    in_flight = min(pp, plan.micro_batches)
    activations = per_layer_act * layers / tp * in_flight
    logits = 4 * s * b * spec.padded_vocab_size(tp) / tp * 2  # fp32 logits and their grad
    return {
        "parameters": params,
        "trained": trained,
        "weights": (copies * params + (trained if cfg.finetuning_type == "lora" else 0))
        * weight_bytes
        / GiB,
        "gradients": trained * 4 / GiB,
        "optimizer": trained * optimizer_bytes / GiB,
        "activations": (activations + logits) / GiB,
    }


def describe_plan(cfg: TrainingCommandConfig) -> str:
    """The human-readable plan; raises ConfigError on an invalid config."""
    tp, pp = resolve_layout(cfg)
    world = int(os.environ.get("WORLD_SIZE", tp * pp))
    spec = cfg.model.spec()
    plan = validate(cfg, world, spec)
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
    ]
    return "\n".join(lines)
