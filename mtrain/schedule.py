"""One global batch through megatron-core's pipeline schedule, and the metrics it reports.

Metrics are reduced in one collective per step: every task reports its values as
tensor([sum, weight]) under names from a fixed list, so ranks never exchange names.
"""

from __future__ import annotations

import torch

from mtrain import accel

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
)


def _metric_sums(outputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """[sum, weight] per METRICS entry over micro-batches and DP, on every rank (collective)."""
    from megatron.core import parallel_state as ps

    sums = torch.zeros(len(METRICS), 2, device=accel.device())
    for out in outputs:  # only the last pipeline stage has outputs
        for name, value in out.items():
            sums[METRICS.index(name)] += value.to(sums.device).float()
    torch.distributed.all_reduce(sums, group=ps.get_data_parallel_group())
    torch.distributed.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
    return sums


def means(sums: torch.Tensor) -> dict[str, float]:
    return {name: s / w for name, (s, w) in zip(METRICS, sums.tolist()) if w > 0}


def run_schedule(
    model,
    iterators,
    forward,
    loss,
    plan,
    tr,
    forward_only: bool,
    rows: int = 1,
    micro_batches: int | None = None,
):
    """One global batch (or `micro_batches` micro-batches) through megatron's pipeline schedule;
    returns the metric sums. `rows`: sequences per sample (the schedule sizes its pipeline
    messages by them)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, chunk):
        batch = {k: v.to(accel.device(), non_blocking=True) for k, v in next(data_iterator).items()}
        return forward(chunk, batch), lambda out: loss(batch, out)

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=model,
        num_microbatches=plan.micro_batches if micro_batches is None else micro_batches,
        seq_length=tr.seq_length,
        micro_batch_size=tr.micro_batch_size * rows,
        forward_only=forward_only,
    )
    return _metric_sums(outputs)
