"""One global batch through megatron-core's pipeline schedule, and the metrics it reports.

Metrics are reduced in one collective per step: every task reports its values as
tensor([sum, weight]) under names from a fixed list, so ranks never exchange names.
"""

from __future__ import annotations

import torch

from mtrain import accel, compat, parallel
from mtrain.context_parallel import layout_of, shard_batch

# Metrics a task may report, each as tensor([sum, weight]); a fixed order lets every rank
# reduce them in one collective without exchanging names.
METRICS = (
    "loss",
    "accuracy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
    "kl",
)


def _metric_sums(outputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """[sum, weight] per METRICS entry over micro-batches, DP and CP ranks, on every rank
    (collective): under CP each rank reports its own tokens' share."""
    sums = torch.zeros(len(METRICS), 2, device=accel.device())
    for out in outputs:  # only the last pipeline stage has outputs
        for name, value in out.items():
            sums[METRICS.index(name)] += value.to(sums.device).float()
    torch.distributed.all_reduce(sums, group=parallel.replica_group())
    torch.distributed.all_reduce(sums, group=parallel.pp_group())
    return sums


def means(sums: torch.Tensor) -> dict[str, float]:
    return {name: s / w for name, (s, w) in zip(METRICS, sums.tolist()) if w > 0}


def run_schedule(
    model,
    iterators,
    forward,
    loss,
    micro_batches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
    units=None,
) -> torch.Tensor:
    """`micro_batches` micro-batches through megatron's pipeline schedule; returns the metric
    sums. `micro_batch_size` counts the sequences the model sees (a DPO pair is two): the
    schedule sizes its pipeline messages by it and `seq_length` (megatron divides it by CP).
    Under context parallelism each rank takes its chunks of every sequence (in the layout the
    model wants, see mtrain/context_parallel.py) and its loss counts are summed over CP. With
    `units` (batch -> the loss units `loss` counts), an MoE model's router losses weigh per loss
    unit (compat.weigh_router_losses_per_loss_unit)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    cp, cp_rank, cp_group = parallel.cp_size(), parallel.cp_rank(), parallel.cp_group()
    config = get_model_config(model[0])
    cp_layout = layout_of(config) if cp > 1 else "balanced"
    weigh_router = units is not None and not forward_only and config.num_moe_experts

    def counted(batch, out):
        result = loss(batch, out)
        if len(result) != 3:  # (value, metrics): no token count (e.g. mtrain.verify's capture)
            return result
        total, count, metrics = result
        return total, compat.count_loss_tokens_over_context_parallel(count, cp_group), metrics

    def forward_step(data_iterator, chunk):
        batch = {k: v.to(accel.device(), non_blocking=True) for k, v in next(data_iterator).items()}
        whole = batch  # the micro-batch's units and tokens, the same on every CP rank
        batch = shard_batch(batch, cp, cp_rank, cp_layout)
        output = forward(chunk, batch)
        if weigh_router:
            compat.weigh_router_losses_per_loss_unit(
                output, units(whole), whole["tokens"].numel(), config
            )
        return output, lambda out: counted(batch, out)

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=model,
        num_microbatches=micro_batches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return _metric_sums(outputs)
