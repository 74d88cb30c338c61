"""Size estimates of a training run, from the config and the model table alone: memory per
device (what `dry_run=true` prints) and the disk space of one checkpoint (what the pre-flight
checks want free).

The memory estimate is for the most loaded pipeline stage. Weights in the training precision; fp32
gradient buffers; Adam in fp32 (master weights + two moments), divided over DP with the
distributed optimizer. Activations per layer and micro-batch follow Korthikanti et al. (2022):
s*b*h*(34 + 5*a*s/h) bytes without recomputation (the 5as/h term is the attention matrix, which
only kernels=local, or the NPU kernels with npu.flash_attn=false, materialise; the flash
attentions of sdpa, te, torch_npu and mindspeed do not), 34*s*b*h with selective and 2*s*b*h with
full recomputation, divided by TP, times the micro-batches the first 1F1B stage keeps in flight
(min(pp, micro-batches)).

Context parallelism (parallel.cp) divides every activation by cp: each rank holds s/cp tokens
between the attentions, and inside Ulysses' attention the whole sequence for 1/cp of the heads
(the attention matrix, where there is one, is a/(tp*cp) heads of s x s). Packed rows with a dense
block-causal mask (every kernel but torch_npu's flash attention, which takes cu_seqlens) hold
that s x s boolean mask whole on every rank.

Mixture of experts: a device holds the non-expert weights split over TP and E/EP experts split
over ETP; expert gradients and Adam state divide over the expert data-parallel ranks
(world / (ETP x EP x PP)) with the distributed optimizer. An MoE layer keeps, per micro-batch,
the k routed copies of each token at the expert input plus the fc1 and activation outputs
(k*s*b*(h + 3F/ETP) values); the all-to-all dispatcher holds the k*s*b/TP*h tokens it sends and
receives back (two buffers) while a layer runs.
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


def attention_matrix(cfg: TrainingCommandConfig) -> bool:
    """The attention materialises its s x s scores (megatron's unfused softmax)."""
    if cfg.kernels == "auto":  # local on CPU; a flash attention on CUDA and NPU
        return cfg.device == "cpu"
    if cfg.kernels in ("torch_npu", "mindspeed"):
        return not cfg.npu.flash_attn
    return cfg.kernels == "local"


def varlen_attention(cfg: TrainingCommandConfig) -> bool:
    """Packed rows reach the attention as cu_seqlens, not as a dense mask."""
    return cfg.kernels == "torch_npu" and cfg.npu.flash_attn


DEVICE_MEMORY_GIB = {"auto": 64.0, "npu": 64.0, "cuda": 80.0}  # when device_memory_gib is unset


def device_memory(cfg: TrainingCommandConfig) -> float | None:
    """The device memory the estimate is held to; None on CPU."""
    given = getattr(cfg, "device_memory_gib", None)
    return given if given is not None else DEVICE_MEMORY_GIB.get(cfg.device)


def fits(total_gib: float, device_gib: float) -> bool:
    """The estimate leaves room for the allocator, communication buffers and the framework's
    own memory: about a tenth of the device."""
    return total_gib <= 0.9 * device_gib


def memory_estimate(
    cfg: TrainingCommandConfig, plan: ParallelPlan, spec: ModelSpec | None = None
) -> dict[str, float]:
    spec = cfg.model.spec() if spec is None else spec
    tp, pp, dp, tr = plan.tp, plan.pp, plan.dp, cfg.train
    h = spec.hidden_size
    layers = spec.num_layers // pp
    moe = moe_estimate(cfg, plan, spec)
    # On one device: the layers' TP shards, experts as this EP rank holds them (mean over layers)
    per_layer = (
        sum(spec.layer_parameters(i) for i in range(spec.num_layers)) - moe["model_experts"]
    ) / spec.num_layers + moe["experts_per_layer"] * tp
    vocab = spec.padded_vocab_size(tp) * h
    first = layers * per_layer / tp + vocab / tp
    last = layers * per_layer / tp + (vocab / tp if (not spec.tie_word_embeddings or pp > 1) else 0)
    params = max(first, last) if pp > 1 else first + last - layers * per_layer / tp
    # Gradients and optimizer state exist for trained parameters only: with LoRA, the adapters.
    trained = lora_parameters(cfg, spec, tp) * layers if cfg.finetuning_type == "lora" else params
    weight_bytes, optimizer_bytes = bytes_per_parameter(tr.precision)
    experts = moe["experts_per_layer"] * layers if cfg.finetuning_type != "lora" else 0.0
    optimizer = trained * optimizer_bytes
    if cfg.parallel.distributed_optimizer:
        # megatron shards the distributed optimizer over the ranks that hold the same weights:
        # data x context parallel for the dense ones, the expert data-parallel ranks for experts.
        optimizer = (trained - experts) * optimizer_bytes / (dp * plan.cp) + (
            experts * optimizer_bytes / moe["expert_dp"]
        )
    # DPO: a sample is a pair (two sequences); a `model` reference of a full fine-tune is a
    # second copy of the weights (with LoRA it is the policy with its adapters off).
    dpo = getattr(cfg, "dpo", None)
    rows = 2 if dpo is not None else 1
    copies = (
        2 if dpo is not None and dpo.reference == "model" and cfg.finetuning_type != "lora" else 1
    )
    s, b, a, cp = tr.seq_length, tr.micro_batch_size * rows, spec.num_attention_heads, plan.cp
    scores = 5 * a * s / h if attention_matrix(cfg) else 0.0
    per_layer_act = {
        None: s * b * h * (34 + scores),
        "selective": 34 * s * b * h,
        "full": 2 * s * b * h,
    }[tr.recompute]
    in_flight = min(pp, plan.micro_batches)
    # full recompute keeps only each layer's input, counted above
    moe_layers = sum(spec.is_moe_layer(i) for i in range(spec.num_layers)) / pp
    moe_layers *= tr.recompute != "full"
    activations = (
        per_layer_act * layers / (tp * cp) + moe["activation_bytes"] * moe_layers
    ) * in_flight
    logits = 4 * s * b * spec.padded_vocab_size(tp) / (tp * cp) * 2  # fp32 logits and their grad
    if getattr(cfg.data, "packing", False) and not varlen_attention(cfg):
        activations += s * s * b * in_flight  # the block-causal mask, one byte per entry
    return {
        "parameters": params,
        "trained": trained,
        "weights": (copies * params + (trained if cfg.finetuning_type == "lora" else 0))
        * weight_bytes
        / GiB,
        "gradients": trained * 4 / GiB,
        "optimizer": optimizer / GiB,
        "activations": (activations + logits + moe["dispatcher_bytes"]) / GiB,
        "experts": experts,  # expert parameters on the device
        "dispatcher": moe["dispatcher_bytes"] / GiB,
    }


def moe_estimate(cfg: TrainingCommandConfig, plan: ParallelPlan, spec: ModelSpec) -> dict:
    """The MoE terms of `memory_estimate` (zeros for a dense model)."""
    zero = dict(model_experts=0.0, experts_per_layer=0.0, expert_dp=1, activation_bytes=0.0)
    if not spec.is_moe:
        return {**zero, "dispatcher_bytes": 0.0}
    family, symbols = spec.family_table, spec.shape_symbols()
    etp = plan.etp or plan.tp
    one_expert = sum(e.numel(symbols) for e in family.expert)
    moe_layers = sum(spec.is_moe_layer(i) for i in range(spec.num_layers))
    s, b, k = cfg.train.seq_length, cfg.train.micro_batch_size, spec.moe_router_topk
    value_bytes = 4 if cfg.train.precision == "fp32" else 2
    h, f = spec.hidden_size, spec.moe_ffn_hidden_size
    return dict(
        model_experts=moe_layers * spec.num_experts * one_expert,
        # mean over layers, per device: E/EP experts cut ETP ways
        experts_per_layer=moe_layers
        / spec.num_layers
        * spec.num_experts
        / plan.ep
        * one_expert
        / etp,
        expert_dp=max(1, plan.world_size // (etp * plan.ep * plan.pp)),
        activation_bytes=k * s * b * (h + 3 * f / etp) * value_bytes,
        dispatcher_bytes=2 * k * s * b / plan.tp * h * value_bytes,
    )
