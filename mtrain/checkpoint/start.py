"""Where a training run starts: the resume policy, applied once before the first step."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from mtrain.checkpoint.adapters import AdapterCheckpointInfo
from mtrain.checkpoint.hf_weights import is_hf_dir, load_hf_weights
from mtrain.checkpoint.layout import TRACKER, MegatronCheckpoint, read_tracker
from mtrain.checkpoint.training import (
    DISTRIB_OPTIM_FILE,
    TrainingParts,
    TrainState,
    load_training_checkpoint,
)
from mtrain.checkpoint.weights import load_model_weights, open_matching
from mtrain.errors import ConfigError
from mtrain.models.spec import load_hf_config

if TYPE_CHECKING:
    from mtrain.config.schema import TrainingCommandConfig
    from mtrain.models.spec import ModelSpec
    from mtrain.plan import ParallelPlan

log = logging.getLogger("mtrain.checkpoint")

# In a training checkpoint's args: its MoE experts trained as a grouped GEMM (moe.grouped_gemm).
# The weights are saved under the per-expert names either way; the optimizer state is not.
GROUPED_GEMM_ARG = "mtrain_grouped_gemm_experts"


def starting_point(cfg: TrainingCommandConfig) -> tuple[str | None, bool]:
    """(the checkpoint the run starts from, whether that is resuming `save`)."""
    resuming = cfg.save is not None and (Path(cfg.save) / TRACKER).is_file()
    return (cfg.save if resuming else cfg.load), resuming


def check_start(cfg: TrainingCommandConfig, spec: ModelSpec, plan: ParallelPlan) -> None:
    """Everything about the starting checkpoint that can be refused before the model is built:
    it opens, holds this model (a legacy one at this layout), and a full resume matches the
    optimizer setting."""
    source, resuming = starting_point(cfg)
    if source is None:
        return
    if not resuming and is_hf_dir(source):
        check_hf_start(cfg, spec, source)
        return
    ckpt = open_matching(source, None, spec, plan.tp, plan.pp, plan.vpp, plan.ep)
    ck = cfg.checkpoint
    if (
        cfg.finetuning_type == "lora"
        and ck.save_hf
        and ck.save_hf_lora == "merged"
        and ckpt.format == "torch_dist"
        and ckpt.lora is None
        and (plan.tp, plan.pp, plan.vpp) != (1, 1, 1)
    ):
        raise ConfigError(
            f"checkpoint.save_hf: {source} is a torch_dist base, onto which adapters trained at "
            f"tp={plan.tp} pp={plan.pp} cannot be merged; use checkpoint.save_hf_lora=adapter "
            "(a PEFT adapter), or a base converted with converters.hf2mcore at this layout"
        )
    if not resuming:
        return
    if not ckpt.has_optimizer:
        raise ConfigError(
            f"save={cfg.save} holds a converted ({ckpt.iter_dir.name}) checkpoint, which a run "
            f"must not write into; give the run a save directory of its own and start from it "
            f"with load={cfg.save}"
        )
    if ckpt.lora is None and cfg.finetuning_type == "lora":
        raise ConfigError(
            f"save={cfg.save} holds a full checkpoint, not LoRA adapters; give the LoRA run "
            "a save directory of its own"
        )
    if ckpt.format == "torch_dist":
        distributed = bool(getattr(ckpt.args, "use_distributed_optimizer", False))
    else:
        distributed = (ckpt.rank_file(0, 0).parent / DISTRIB_OPTIM_FILE).is_file()
    if distributed != plan.distributed_optimizer:
        saved = str(distributed).lower()
        raise ConfigError(
            f"{ckpt.iter_dir} was saved with parallel.distributed_optimizer={saved}; resume with "
            f"parallel.distributed_optimizer={saved} (the optimizer state is laid out "
            "differently), or start afresh from its weights with a new save= and "
            f"load={cfg.save} checkpoint.finetune=true"
        )
    grouped = bool(getattr(ckpt.args, GROUPED_GEMM_ARG, False))
    if spec.is_moe and grouped != bool(cfg.moe.grouped_gemm):
        saved = str(grouped).lower()
        raise ConfigError(
            f"{ckpt.iter_dir} was trained with moe.grouped_gemm={saved}; resume with "
            f"moe.grouped_gemm={saved} (the optimizer state is laid out per parameter, and "
            "grouped experts are one parameter per layer), or start afresh from its weights "
            f"with a new save= and load={cfg.save} checkpoint.finetune=true"
        )


def check_hf_start(cfg: TrainingCommandConfig, spec: ModelSpec, hf_dir: str) -> None:
    """`load=` an HF model directory: its config.json must describe this run's model."""
    hf_spec, _ = load_hf_config(hf_dir)
    differ = [k for k, v in vars(hf_spec).items() if getattr(spec, k) != v]
    if differ:
        listed = ", ".join(f"{k}={getattr(hf_spec, k)} (run: {getattr(spec, k)})" for k in differ)
        raise ConfigError(f"load={hf_dir}: its config.json describes another model: {listed}")
    if cfg.finetuning_type == "lora":
        raise ConfigError(
            f"load={hf_dir} is an HF model; LoRA adapters record a Megatron base checkpoint, so "
            "convert it first (converters.hf2mcore at the run's tp/pp) and load= that"
        )


def load_start_weights(chunks: list, source: str, spec: ModelSpec, plan: ParallelPlan) -> None:
    """The weights a run (or DPO's frozen reference) starts from: an HF directory's or a
    Megatron checkpoint's (an adapter checkpoint on its base)."""
    if is_hf_dir(source):
        load_hf_weights(chunks, source, spec, plan.tp, plan.pp, plan.vpp, plan.ep)
    else:
        load_model_weights(chunks, source, spec, plan.tp, plan.pp, plan.vpp, ep=plan.ep)


def resume(
    cfg: TrainingCommandConfig, spec: ModelSpec, plan: ParallelPlan, parts: TrainingParts
) -> tuple[TrainState, AdapterCheckpointInfo | None]:
    """Resume `save` if it holds a checkpoint (a resubmitted job repeats its command line,
    `load=` included); else start from `load` (weights only for a converted checkpoint or with
    checkpoint.finetune=true); else from a random init. Collective. `check_start` has already
    refused what can be refused early.

    With LoRA, also returns what the run's adapter checkpoints record about their base: a full
    checkpoint in `load` is the base (fresh adapters); an adapter checkpoint brings its own."""
    source, resuming = starting_point(cfg)
    if source is None:
        log.info("training from a random init (seed %d)", cfg.train.seed)
        return TrainState(), None
    if resuming and cfg.load is not None:
        log.info(
            "save=%s already holds a checkpoint: resuming it (load= only starts a run)", cfg.save
        )
    if not resuming and is_hf_dir(source):
        load_hf_weights(parts.model, source, spec, plan.tp, plan.pp, plan.vpp, plan.ep)
        parts.optimizer.reload_model_params()  # see the weights-only start below
        log.info("starting from the HF weights of %s (read by each rank, no conversion)", source)
        return TrainState(), None
    layout = (spec, plan.tp, plan.pp, plan.vpp)
    iteration = read_tracker(Path(source))
    opened = MegatronCheckpoint.open(Path(source), iteration)
    found = opened.lora
    adapters, base_dir = None, None
    if cfg.finetuning_type == "lora":
        if found is None:  # the base model: the adapters start fresh
            adapters = AdapterCheckpointInfo(cfg.lora, str(Path(source).resolve()), str(iteration))
        else:
            found.check_matches(cfg.lora, source)
            base, base_iteration = found.base_dir, found.base_iteration
            if not Path(base).is_dir() and cfg.load not in (None, source):
                base_dir = cfg.load  # the base moved; load= says where it is now
                base, base_iteration = str(Path(base_dir).resolve()), read_tracker(Path(base_dir))
            # This run's settings (dropout may differ) on the adapters' base.
            adapters = AdapterCheckpointInfo(cfg.lora, base, str(base_iteration))
    # A converted checkpoint (release, or numbered as MindSpeed-LLM's converter writes it) has
    # weights only: it starts a run from them, as does the base model of a LoRA run.
    weights_only = not resuming and (
        cfg.checkpoint.finetune
        or not opened.has_optimizer
        or (cfg.finetuning_type == "lora" and found is None)
    )
    if weights_only:
        load_model_weights(parts.model, source, *layout, base_dir=base_dir, ep=plan.ep)
        # bf16/fp16: the optimizer's fp32 master weights were copied at construction; refresh
        # them, or the first step would write the random init back over the loaded weights.
        parts.optimizer.reload_model_params()
        log.info(
            "starting from the weights of %s (iteration, optimizer and data position start afresh)",
            source,
        )
        return TrainState(), adapters
    state = load_training_checkpoint(source, parts, *layout, base_dir=base_dir, ep=plan.ep)
    log.info(
        "resumed at iteration %d (%d samples consumed)", state.iteration, state.consumed_samples
    )
    return state, adapters
