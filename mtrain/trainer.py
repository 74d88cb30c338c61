"""The one training loop PT, SFT and DPO share, on megatron-core.

A stage plugs in a `Task`: where its micro-batches come from and how its loss is computed. The
loop does the rest: process groups, model, DDP, optimizer, schedule, checkpoints, logging.

Loss semantics: every micro-batch returns (sum of token losses, number of loss tokens). The
reported loss and the gradient are both the mean over all loss tokens of the global batch, across
micro-batches and data-parallel ranks (megatron's `calculate_per_token_loss`): padding, prompt
tokens or uneven micro-batches never reweight the tokens that count. An MoE model's router
losses weigh per loss unit too (`compat.weigh_router_losses_per_loss_unit`).
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable

import torch
from omegaconf import OmegaConf

from mtrain import accel, compat, kernels, parallel
from mtrain import log as mlog
from mtrain.checkpoint import (
    GROUPED_GEMM_ARG,
    TrainingParts,
    check_start,
    export_run_checkpoint,
    megatron_args,
    resume,
    save_training_checkpoint,
    starting_point,
)
from mtrain.config.schema import TrainingCommandConfig, validate
from mtrain.context_parallel import check_context_parallel
from mtrain.dtypes import DTYPE_NAMES, DTYPES
from mtrain.errors import ConfigError, MtrainError
from mtrain.freeze import apply_freeze
from mtrain.lora import add_adapters
from mtrain.models.provider import BuildOptions, build_model_chunks
from mtrain.models.score import train_score_head
from mtrain.moe_metrics import MoeMetrics
from mtrain.optim import build_optimizer, connect_schedule, wrap_ddp
from mtrain.plan import ParallelPlan
from mtrain.preflight import check_outputs
from mtrain.progress import Progress, flops_per_token
from mtrain.schedule import METRICS, means, run_schedule
from mtrain.task import Run, Setup, Task

log = logging.getLogger("mtrain.train")


class TrainingError(MtrainError):
    """Training cannot go on (e.g. a NaN loss); the message names the iteration."""


class _Preemption:
    """SIGTERM (e.g. Slurm preemption) asks for a checkpoint and a clean exit at the next step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM received: saving a checkpoint after this iteration, then exiting")

    def agreed(self) -> bool:
        """True on every rank as soon as any rank got the signal (collective)."""
        flag = torch.tensor([int(self.requested)], device=accel.device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _build(cfg: TrainingCommandConfig, setup: Setup, task: Task):
    tr, par, spec, plan = cfg.train, cfg.parallel, setup.spec, setup.plan
    opts = BuildOptions(
        tp=plan.tp,
        pp=plan.pp,
        vpp=plan.vpp,
        ep=plan.ep,
        etp=plan.etp,
        moe=cfg.moe,
        precision=tr.precision,
        sequence_parallel=plan.sequence_parallel,
        cp=plan.cp,
        kernels=setup.kernels,
        npu=cfg.npu,
        recompute_granularity=tr.recompute,
        init_method_std=tr.init_std,
        explicit_attention_mask=task.attention_mask,
        head=task.head,
        # A run that starts from weights (resumed, loaded or HF) overwrites every base one.
        initialize=starting_point(cfg)[0] is None,
        extra={
            "calculate_per_token_loss": True,
            **kernels.config_fields(setup.kernels, cfg, plan),
        },
    )
    chunks = [c.to(accel.device()) for c in build_model_chunks(spec, opts)]
    if cfg.finetuning_type == "freeze":
        trainable, total = apply_freeze(
            chunks, list(cfg.freeze.trainable), spec.num_layers, spec.tie_word_embeddings
        )
        what = "freeze"
    elif cfg.finetuning_type == "lora":
        trainable, total = add_adapters(chunks, cfg.lora, tr.seed)
        what = f"lora (r={cfg.lora.r}, alpha={cfg.lora.alpha:g} on {', '.join(cfg.lora.target_modules)})"
    if task.head == "score" and cfg.finetuning_type != "full":
        trainable += train_score_head(chunks)
    if cfg.finetuning_type != "full":
        log.info(
            "%s: this rank trains %d of %d parameters (%.2f%%)",
            what,
            trainable,
            total,
            100 * trainable / max(total, 1),
        )
        fewest = torch.tensor([trainable], device=accel.device())
        torch.distributed.all_reduce(fewest, op=torch.distributed.ReduceOp.MIN)
        if fewest.item() == 0:
            raise ConfigError(
                f"freeze.trainable={list(cfg.freeze.trainable)} leaves a pipeline stage with "
                "nothing to train, which megatron-core's optimizer cannot handle; name something "
                "on every stage (e.g. output_layer with tied embeddings) or lower parallel.pp"
            )
    model = wrap_ddp(chunks, par)
    if cfg.finetuning_type != "full":
        compat.keep_frozen_tied_embedding_reducible(model)
    optimizer, scheduler = build_optimizer(model, tr, plan.distributed_optimizer)
    connect_schedule(model, optimizer)
    return model, optimizer, scheduler, opts


def evaluate(
    model, task: Task, cfg: TrainingCommandConfig, plan: ParallelPlan, dp_rank: int
) -> dict[str, float]:
    """One pass over the validation set (whole global batches, at most eval.max_batches)."""
    tr = cfg.train
    batches = task.eval_samples // tr.global_batch_size
    if cfg.eval.max_batches is not None:
        batches = min(batches, cfg.eval.max_batches)
    iterators = [task.eval_batches(dp_rank, plan.dp) for _ in model]
    for m in model:
        m.eval()
    sums = torch.zeros(len(METRICS), 2, device=accel.device())
    with torch.no_grad():
        for _ in range(batches):
            sums += run_schedule(
                model,
                iterators,
                task.eval_forward,
                task.eval_loss,
                plan.micro_batches,
                tr.seq_length,
                tr.micro_batch_size * task.rows_per_sample,
                forward_only=True,
            )
    for m in model:
        m.train()
    return means(sums)


def train(
    cfg: TrainingCommandConfig, make_task: Callable[[TrainingCommandConfig, Setup], Task]
) -> list[dict[str, float]]:
    """Run a training command; returns the per-iteration metrics (rank 0 has them all)."""
    spec = cfg.model.spec()
    plan = validate(cfg, parallel.world_size(), spec)
    check_outputs(cfg, spec)
    check_start(cfg, spec, plan)
    mlog.setup(all_ranks=cfg.log.all_ranks)
    setup = Setup(spec, plan, kernels.start(cfg, plan, spec))
    check_context_parallel(cfg, spec, plan.tp, setup.kernels)
    parallel.init(
        plan.tp, plan.pp, plan.vpp, seed=cfg.train.seed, cp=plan.cp, ep=plan.ep, etp=plan.etp
    )
    try:
        return _run(cfg, make_task, setup)
    finally:
        # Leave the process groups before the interpreter tears down, so no communication
        # thread outlives it (seen: an abort at exit, "terminate called without an active
        # exception", after a finished run).
        parallel.shutdown()


def _run(cfg: TrainingCommandConfig, make_task, setup: Setup) -> list[dict[str, float]]:
    spec, plan, tr = setup.spec, setup.plan, cfg.train
    task = make_task(cfg, setup)  # may resolve train.epochs into train.iters
    model, optimizer, scheduler, options = _build(cfg, setup, task)
    parts = TrainingParts(model, optimizer, scheduler)
    state, adapters = resume(cfg, spec, plan, parts)
    run = Run(model, state, setup, options, cfg)
    if task.on_start is not None:
        task.on_start(run)
    dp_rank, dp = parallel.dp_rank(), plan.dp
    # One iterator per model chunk: with interleaving, every chunk draws each micro-batch.
    iterators = [task.batches(state.consumed_samples, dp_rank, dp) for _ in model]

    dtype_name = DTYPE_NAMES[DTYPES[tr.precision]]
    args = megatron_args(spec, plan.tp, plan.pp, plan.vpp, dtype_name, plan.ep)
    args.data_parallel_size = plan.dp
    args.context_parallel_size = plan.cp
    args.use_distributed_optimizer = plan.distributed_optimizer
    vars(args)[GROUPED_GEMM_ARG] = spec.is_moe and cfg.moe.grouped_gemm
    args.ckpt_format = "torch" if cfg.checkpoint.format == "legacy" else "torch_dist"
    if adapters is not None:
        vars(args).update(adapters.to_args())
    vars(args).update(task.checkpoint_args or {})
    tokens_per_iter = tr.global_batch_size * tr.seq_length * task.rows_per_sample
    progress = Progress(
        total_iters=tr.iters,
        tokens_per_iter=tokens_per_iter,
        flops_per_iter=flops_per_token(spec, tr.seq_length) * tokens_per_iter,
        devices=parallel.world_size(),
        peak_tflops=cfg.log.peak_tflops or accel.peak_tflops(),
        interval=cfg.log.interval,
        tensorboard_dir=cfg.log.tensorboard_dir if torch.distributed.get_rank() == 0 else None,
        metrics_file=cfg.log.metrics_file if torch.distributed.get_rank() == 0 else None,
        wandb_project=cfg.log.wandb_project if torch.distributed.get_rank() == 0 else None,
        run_config=OmegaConf.to_container(OmegaConf.structured(cfg)),
        start_iter=state.iteration,
    )
    log.info(
        "training %s: %s, tp=%d pp=%d vpp=%d cp=%d dp=%d%s, %d micro-batches of %d per step, "
        "%d iterations, kernels=%s",
        task.name,
        cfg.model.display_name,
        plan.tp,
        plan.pp,
        plan.vpp,
        plan.cp,
        dp,
        f" ep={plan.ep}" if spec.is_moe else "",
        plan.micro_batches,
        tr.micro_batch_size,
        tr.iters,
        kernels.describe(setup.kernels),
    )
    moe = MoeMetrics(model, spec, accel.device()) if spec.is_moe else None
    preemption = _Preemption()
    try:
        while state.iteration < tr.iters:
            for m in model:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            step_iterators = iterators
            if task.before_step is not None:
                batches = [next(iterators[0]) for _ in range(plan.micro_batches)]
                task.before_step(run, batches)
                step_iterators = [iter(batches) for _ in model]
            metrics = means(
                run_schedule(
                    model,
                    step_iterators,
                    task.forward,
                    task.loss,
                    plan.micro_batches,
                    tr.seq_length,
                    tr.micro_batch_size * task.rows_per_sample,
                    forward_only=False,
                    units=task.units,
                )
            )
            if moe is not None:
                metrics.update(moe.collect(plan.micro_batches))
            metrics["lr"] = optimizer.param_groups[0]["lr"]  # the rate this step uses
            loss = metrics.get("loss", float("nan"))
            skipped = False
            if not math.isfinite(loss):
                if tr.on_nan == "stop":
                    raise TrainingError(
                        f"iteration {state.iteration + 1}: loss is {loss}; stopping "
                        "(train.on_nan=skip skips such steps instead)"
                    )
                skipped = True
            if not skipped:
                ok, grad_norm, _ = optimizer.step()
                if grad_norm is not None and not math.isfinite(grad_norm) and tr.on_nan == "stop":
                    raise TrainingError(
                        f"iteration {state.iteration + 1}: gradient norm is {grad_norm}; stopping"
                    )
                skipped = not ok
                if ok:
                    scheduler.step(increment=1)
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
            state.iteration += 1
            state.consumed_samples += tr.global_batch_size
            if tr.precision == "fp16":
                metrics["loss_scale"] = float(optimizer.get_loss_scale())
            progress.step(state.iteration, metrics, skipped)
            every = cfg.eval.interval
            if (
                task.eval_batches
                and every
                and (state.iteration % every == 0 or state.iteration == tr.iters)
            ):
                progress.evaluation(state.iteration, evaluate(model, task, cfg, plan, dp_rank))
            interval = cfg.checkpoint.save_interval
            preempted = preemption.agreed()
            done = state.iteration == tr.iters
            exiting = preempted or (
                tr.exit_after_iters is not None
                and state.iteration - progress.start_iter >= tr.exit_after_iters
            )
            if cfg.save and (done or exiting or (interval and state.iteration % interval == 0)):
                saved = save_training_checkpoint(
                    cfg.save,
                    state,
                    parts,
                    args,
                    cfg.checkpoint.keep_last,
                    adapters_only=adapters is not None,
                    fmt=cfg.checkpoint.format,
                )
                if cfg.checkpoint.save_hf and (
                    done or exiting or cfg.checkpoint.save_hf_every_save
                ):
                    export_run_checkpoint(saved, cfg)
            if exiting and not done:
                log.info(
                    "stopping at iteration %d (%s)%s",
                    state.iteration,
                    "SIGTERM" if preempted else "train.exit_after_iters",
                    "; checkpoint saved" if cfg.save else "; no save= given, nothing saved",
                )
                break
        progress.summary()
        return progress.history
    finally:
        preemption.restore()
