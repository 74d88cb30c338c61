"""Size estimates of a training run, from the config and the model table alone: memory per
device (what `dry_run=true` prints) and the disk space of one checkpoint (what the pre-flight
checks want free).

The memory estimate is for the most loaded pipeline stage. Weights in the training precision; fp32
gradient buffers; Adam in fp32 (master weights + two moments), divided over DP with the
distributed optimizer. Activations per layer and micro-batch follow Korthikanti et al. (2022):
s*b*h*(34 + 5*a*s/h) bytes without recomputation (the 5as/h term is the attention matrix, absent
with flash attention), 34*s*b*h with selective and 2*s*b*h with full recomputation, divided by TP,
times the micro-batches the first 1F1B stage keeps in flight (min(pp, micro-batches)).
"""

from __future__ import annotations

from mtrain.config.schema import TrainingCommandConfig
from mtrain.models.families import Kind
from mtrain.models.spec import ModelSpec
from mtrain.plan import ParallelPlan

GiB = 1024**3


def lora_parameters(cfg: TrainingCommandConfig, spec: ModelSpec, tp: int) -> float:
    """Adapter parameters per layer on one device (mtrain/lora.py's layout: the A of a
    column-parallel base and the B of a row-parallel one are replicated over TP)."""
    r, symbols, total = cfg.lora.r, spec.shape_symbols(), 0.0
    for target in cfg.lora.target_modules:
        entry = spec.family_table.lora_targets[target]
        n_out, n_in = entry.matrix(symbols)
        total += r * (n_in / tp + n_out) if entry.kind is Kind.ROW else r * (n_in + n_out / tp)
    return total


def bytes_per_parameter(precision: str) -> tuple[int, int]:
    """(weights, Adam state) bytes per trained parameter: weights in the training precision;
    Adam's two fp32 moments, plus fp32 master weights with bf16/fp16."""
    return (4, 8) if precision == "fp32" else (2, 12)


def checkpoint_bytes(cfg: TrainingCommandConfig, spec: ModelSpec) -> float:
    """Bytes one training checkpoint takes on disk, over all ranks: the trained weights in the
    training precision plus Adam's state (fp32 master weights with bf16/fp16, two moments);
    with LoRA the adapters alone. The same model state whatever the layout."""
    weight_bytes, optimizer_bytes = bytes_per_parameter(cfg.train.precision)
    if cfg.finetuning_type == "lora":
        stored = lora_parameters(cfg, spec, tp=1) * spec.num_layers
    else:
        stored = spec.num_parameters()
    return stored * (weight_bytes + optimizer_bytes)


def memory_estimate(
    cfg: TrainingCommandConfig, plan: ParallelPlan, spec: ModelSpec | None = None
) -> dict[str, float]:
    spec = cfg.model.spec() if spec is None else spec
    tp, pp, dp, tr = plan.tp, plan.pp, plan.dp, cfg.train
    h = spec.hidden_size
    per_layer = spec.layer_parameters()
    layers = spec.num_layers // pp
    vocab = spec.padded_vocab_size(tp) * h
    first = layers * per_layer / tp + vocab / tp
    last = layers * per_layer / tp + (vocab / tp if (not spec.tie_word_embeddings or pp > 1) else 0)
    params = max(first, last) if pp > 1 else first + last - layers * per_layer / tp
    # Gradients and optimizer state exist for trained parameters only: with LoRA, the adapters.
    trained = lora_parameters(cfg, spec, tp) * layers if cfg.finetuning_type == "lora" else params
    weight_bytes, optimizer_bytes = bytes_per_parameter(tr.precision)
    optimizer_bytes /= dp if cfg.parallel.distributed_optimizer else 1
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
