"""What a training stage (PT, SFT, DPO, RM) plugs into the loop of mtrain/trainer.py: its
micro-batches, forward and loss (`Task`), what is fixed before the model exists (`Setup`) and
what the task's hooks see of a run (`Run`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from mtrain.checkpoint import TrainState
from mtrain.config.schema import TrainingCommandConfig
from mtrain.losses import lm_forward, lm_loss_and_accuracy, logits_forward, token_units
from mtrain.models.provider import BuildOptions
from mtrain.models.spec import ModelSpec
from mtrain.plan import ParallelPlan

Batch = dict[str, torch.Tensor]


@dataclass
class Task:
    """What a stage plugs into the loop."""

    name: str
    # (consumed_samples, dp_rank, dp_size) -> this rank's micro-batches, in order, forever
    batches: Callable[[int, int, int], Iterator[Batch]]
    # (batch, output of `forward`) -> (loss sum, loss token count, {metric: tensor([sum, count])})
    loss: Callable[
        [Batch, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
    ]
    # batch -> the loss units `loss` will count in it (weighs an MoE model's router losses)
    units: Callable[[Batch], torch.Tensor] = token_units
    # (model chunk, batch) -> output tensor; per-token losses on the last pipeline stage
    forward: Callable[[torch.nn.Module, Batch], torch.Tensor] = lm_forward
    # (dp_rank, dp_size) -> this rank's validation micro-batches, one pass; None: no validation
    eval_batches: Callable[[int, int], Iterator[Batch]] | None = None
    eval_samples: int = 0  # validation samples (whole global batches of them are evaluated)
    eval_forward: Callable[[torch.nn.Module, Batch], torch.Tensor] = logits_forward
    eval_loss: Callable = lm_loss_and_accuracy
    attention_mask: bool = False  # batches carry "attention_mask" (e.g. packed samples)
    head: str = "lm"  # lm | score: the model ends in a reward model's scalar head (always trained)
    checkpoint_args: dict | None = None  # added to every checkpoint's args (e.g. the pad id)
    rows_per_sample: int = 1  # sequences the model sees per sample (2 for a DPO pair)
    # Called once the model holds its starting weights, before the first step.
    on_start: Callable[[Run], None] | None = None
    # Called with each step's micro-batches (in order) before the step; may add tensors to them
    # (e.g. DPO's reference log-probs from a forward-only pass of another model).
    before_step: Callable[[Run, list[Batch]], None] | None = None


@dataclass(frozen=True)
class Setup:
    """What is fixed before the model exists: the architecture, the parallel plan and the
    resolved `kernels`. A task factory gets it with the config."""

    spec: ModelSpec
    plan: ParallelPlan
    kernels: str


@dataclass
class Run:
    """What a task's hooks see of the run: the (DDP-wrapped) model chunks, the starting point,
    the setup and how the model was built (to build a twin, e.g. a frozen reference)."""

    model: list
    state: TrainState
    setup: Setup
    options: BuildOptions
    cfg: TrainingCommandConfig

    @property
    def spec(self) -> ModelSpec:
        return self.setup.spec

    @property
    def plan(self) -> ParallelPlan:
        return self.setup.plan
