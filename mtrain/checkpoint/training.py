"""Training checkpoints: the model, optimizer, scheduler, RNG streams and data position of a run.

A save is all-or-nothing: every rank writes into `<save>/.partial_iter_XXXXXXX`, files are
fsynced, then rank 0 renames the directory to `iter_XXXXXXX` and only then updates the tracker
file (itself written atomically). A crash at any point leaves the tracker on the previous
complete checkpoint. `save` must be on a filesystem all nodes share.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtrain import compat, parallel
from mtrain.checkpoint.atomic import fsync
from mtrain.checkpoint.dist_training import load_dist, save_dist
from mtrain.checkpoint.layout import (
    CHECKPOINT_VERSION,
    ITER_DIR,
    iteration_dir_name,
    load_checkpoint_file,
    load_rank_file,
    rank_file,
    save_rank_file,
    write_tracker,
)
from mtrain.checkpoint.rng import rng_state, set_rng_state
from mtrain.checkpoint.weights import fill, load_model_weights, open_matching
from mtrain.errors import CheckpointError
from mtrain.lora import adapter_state_dict
from mtrain.models.spec import ModelSpec

log = logging.getLogger("mtrain.checkpoint")

DISTRIB_OPTIM_FILE = "distrib_optim.pt"


@dataclass
class TrainState:
    """Where training stands: what a resumed run needs besides weights and optimizer."""

    iteration: int = 0
    consumed_samples: int = 0


@dataclass
class TrainingParts:
    """The stateful parts of a run a training checkpoint holds (with the RNG streams)."""

    model: list  # this rank's (DDP-wrapped) model chunks
    optimizer: Any  # megatron-core's (distributed) optimizer
    scheduler: Any  # megatron-core's OptimizerParamScheduler


def save_training_checkpoint(
    save_dir: str | Path,
    state: TrainState,
    parts: TrainingParts,
    args: argparse.Namespace,
    keep_last: int | None,
    adapters_only: bool = False,
    fmt: str = "legacy",
) -> Path:
    """Collective: every rank calls it. Returns the final iteration directory. `fmt`: legacy
    (a file per TP x PP rank) or torch_dist (megatron-core's distributed format).

    With `adapters_only` (LoRA) the model state is the adapters alone; `args` must then name
    the base checkpoint (see mtrain.checkpoint.adapters.AdapterCheckpointInfo)."""
    save_dir = Path(save_dir)
    rank = torch.distributed.get_rank()
    final = save_dir / iteration_dir_name(state.iteration)
    partial = save_dir / f".partial_{final.name}"
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob(".partial_iter_*"):  # left by a crashed save
            shutil.rmtree(stale)
        partial.mkdir()
    torch.distributed.barrier()

    # RNG states of every DP (x CP) rank, so a resumed run continues each rank's stream.
    rng = [None] * parallel.replica_size()
    torch.distributed.all_gather_object(rng, rng_state(), group=parallel.replica_group())
    args = argparse.Namespace(
        **vars(args), iteration=state.iteration, consumed_train_samples=state.consumed_samples
    )
    common = {
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": state.iteration,
        "opt_param_scheduler": parts.scheduler.state_dict(),
    }
    if fmt == "torch_dist":
        save_dist(partial, common, parts, rng)
    else:
        _save_legacy(partial, common, parts, rng, adapters_only)
    torch.distributed.barrier()

    if rank == 0:
        _move_into_place(partial, final)
        write_tracker(save_dir, state.iteration)  # fsyncs save_dir: the rename above too
        if keep_last is not None:
            prune(save_dir, state.iteration, keep_last)
        log.info("saved checkpoint %s", final)
    torch.distributed.barrier()
    return final


def _save_legacy(
    partial: Path, common: dict[str, Any], parts: TrainingParts, rng: list, adapters_only: bool
) -> None:
    ep = parallel.ep_size()
    ep_rank = parallel.ep_rank() if ep > 1 else 0
    path = rank_file(
        partial, parallel.tp_rank(), parallel.pp_rank(), parallel.pp_size(), ep_rank, ep
    )
    optimizer = parts.optimizer
    if getattr(optimizer.config, "use_distributed_optimizer", False):  # DP collective
        path.parent.mkdir(parents=True, exist_ok=True)
        optimizer.save_parameter_state(str(path.parent / DISTRIB_OPTIM_FILE))
    # One file per TP x PP x EP rank, as Megatron-LM writes them: each EP rank holds other
    # experts; the DP x CP ranks of one such rank hold the same weights, and one of them writes.
    if (parallel.expert_dp_rank() if ep > 1 else parallel.replica_rank()) == 0:
        payload = {**common, "optimizer": optimizer.state_dict(), "rng_state": rng}
        unwrapped = [getattr(m, "module", m) for m in parts.model]
        states = [adapter_state_dict(m) if adapters_only else m.state_dict() for m in unwrapped]
        if len(states) == 1:
            payload["model"] = states[0]
        else:
            payload.update({f"model{i}": s for i, s in enumerate(states)})
        save_rank_file(path, payload)
        for written in path.parent.iterdir():
            fsync(written)


def _move_into_place(partial: Path, final: Path) -> None:
    """Rename the finished save to its name. Re-saving an iteration replaces the old copy only
    once the new one is in place (the old one is set aside, then removed)."""
    if not final.exists():
        partial.rename(final)
        return
    aside = final.with_name(f".replaced_{final.name}")
    if aside.exists():
        shutil.rmtree(aside)
    final.rename(aside)
    partial.rename(final)
    shutil.rmtree(aside)


def saved_iterations(save_dir: Path) -> list[int]:
    """The iterations of the `iter_NNNNNNN` directories in `save_dir`, in order."""
    found = (ITER_DIR.fullmatch(p.name) for p in save_dir.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def prune(save_dir: Path, newest: int, keep_last: int) -> None:
    """Keep the `keep_last` newest checkpoints of this run's history: `newest` (just saved, and
    what the tracker names) and the iterations before it. A directory numbered above `newest`
    (a save left from before a tracker was rolled back by hand, or one whose tracker is gone)
    is not part of that history and is never removed; nor is anything else in `save_dir`."""
    saved = saved_iterations(save_dir)
    older = [it for it in saved if it < newest]
    for it in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(save_dir / iteration_dir_name(it))
    later = [it for it in saved if it > newest]
    if later:
        log.warning(
            "checkpoint.keep_last: %s holds iterations after %d (%s) that this run did not "
            "write; they are left alone",
            save_dir,
            newest,
            ", ".join(map(str, later)),
        )


@torch.no_grad()  # in fp32 the optimizer's main params are the model params themselves
def load_training_checkpoint(
    load_dir: str | Path,
    parts: TrainingParts,
    spec: ModelSpec,
    tp: int,
    pp: int,
    vpp: int,
    base_dir: str | Path | None = None,
    ep: int = 1,
) -> TrainState:
    """Collective: resume weights, optimizer, scheduler, RNG and data position (`base_dir`:
    where an adapter checkpoint's base is, if not where it was). A torch_dist checkpoint may have
    been saved at another TP x PP x DP: it is resharded."""
    opened = open_matching(load_dir, None, spec, tp, pp, vpp, ep)
    if opened.format == "torch_dist":
        if not opened.has_optimizer:
            raise CheckpointError(
                f"{opened.iter_dir} holds weights only (no optimizer state); to start training "
                "from it pass checkpoint.finetune=true"
            )
        common = load_dist(
            opened, parts, lambda chunks, states, where: fill(chunks, states, where, spec)
        )
        return TrainState(
            iteration=int(common["iteration"]),
            consumed_samples=int(getattr(opened.args, "consumed_train_samples", 0)),
        )
    ckpt = load_model_weights(parts.model, load_dir, spec, tp, pp, vpp, base_dir=base_dir, ep=ep)
    path = ckpt.rank_file(
        parallel.tp_rank(), parallel.pp_rank(), parallel.ep_rank() if ep > 1 else 0
    )
    payload = load_rank_file(path, mmap=False)
    if "optimizer" not in payload:
        raise CheckpointError(
            f"{ckpt.iter_dir} holds weights only (no optimizer state); to "
            "start training from it pass checkpoint.finetune=true"
        )
    optimizer = parts.optimizer
    optimizer.load_state_dict(payload["optimizer"])
    if getattr(optimizer.config, "use_distributed_optimizer", False):
        shard_file = path.parent / DISTRIB_OPTIM_FILE  # there: see resume.check_start
        compat.load_distributed_optimizer_state(
            optimizer, str(shard_file), load=lambda f: load_checkpoint_file(Path(f), mmap=False)
        )
    parts.scheduler.load_state_dict(payload["opt_param_scheduler"])
    rng = payload.get("rng_state")
    if rng is not None and len(rng) == parallel.replica_size():
        set_rng_state(rng[parallel.replica_rank()])
    args = payload["args"]
    return TrainState(
        iteration=int(payload["iteration"]),
        consumed_samples=int(getattr(args, "consumed_train_samples", 0)),
    )
