"""Loading (and, for training, saving) model state in the Megatron legacy format."""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtrain import compat
from mtrain.checkpoint_format import (
    CHECKPOINT_VERSION,
    TRACKER,
    MegatronCheckpoint,
    iteration_dir_name,
    load_rank_file,
    rank_file,
    save_rank_file,
)
from mtrain.errors import CheckpointError
from mtrain.lora import adapter_state_dict, is_adapter_key
from mtrain.models.spec import ModelSpec

log = logging.getLogger("mtrain.checkpoint")


def _open_matching(
    ckpt_dir: str | Path, iteration: str | None, spec: ModelSpec, tp: int, pp: int, vpp: int
) -> MegatronCheckpoint:
    ckpt = MegatronCheckpoint.open(Path(ckpt_dir), iteration)
    for key, value in vars(spec).items():
        if getattr(ckpt.spec, key) != value:
            raise CheckpointError(
                f"{ckpt.iter_dir}: checkpoint has {key}={getattr(ckpt.spec, key)}"
                f" but the model config has {key}={value}"
            )
    if (ckpt.tp, ckpt.pp, ckpt.vpp) != (tp, pp, vpp):
        raise CheckpointError(
            f"{ckpt.iter_dir} was written at tp={ckpt.tp} pp={ckpt.pp} vpp={ckpt.vpp} but this run "
            f"uses tp={tp} pp={pp} vpp={vpp}; reshard it with converters.mcore2hf then "
            f"converters.hf2mcore, or run with the checkpoint's layout"
        )
    return ckpt


def _fill(chunks: list[torch.nn.Module], ckpt: MegatronCheckpoint, adapters: bool) -> None:
    """Load the base parameters (or, with `adapters`, the LoRA adapters) of this rank's chunks
    from `ckpt`; every one of them must be there, and nothing else."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    path = ckpt.rank_file(tp_rank, pp_rank)
    tied_copy = ckpt.spec.family_table.output.mcore if ckpt.spec.tie_word_embeddings else None
    for chunk, state in zip(chunks, ckpt.load_model_states(tp_rank, pp_rank)):
        model = getattr(chunk, "module", chunk)  # unwrap DDP
        if adapters and not any(is_adapter_key(k) for k in model.state_dict()):
            raise CheckpointError(
                f"{ckpt.iter_dir} holds LoRA adapters but the model has none: train with "
                "finetuning_type=lora, or merge them first (converters.mcore2hf lora.merge=true)"
            )
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [
            k for k in missing if not k.endswith("._extra_state") and is_adapter_key(k) == adapters
        ]
        unexpected = [k for k in unexpected if k != tied_copy]
        if missing or unexpected:
            what = f"lacks {missing[0]}" if missing else f"has unexpected {unexpected[0]}"
            raise CheckpointError(
                f"{path} {what} ({len(missing)} missing, {len(unexpected)} unexpected tensors)"
            )


def load_model_weights(
    chunks: list[torch.nn.Module],
    ckpt_dir: str | Path,
    spec: ModelSpec,
    tp: int,
    pp: int,
    vpp: int = 1,
    iteration: str | None = None,
    base_dir: str | Path | None = None,
) -> MegatronCheckpoint:
    """Load this rank's shard of a checkpoint into its model chunk(s), strictly.

    A full checkpoint fills every base parameter; adapters the model may have keep their init
    (a LoRA run starting). An adapter checkpoint first loads its base (`base_dir`, by default
    the one recorded in it), then fills every adapter. The checkpoint must have the run's model
    and layout: the legacy format cannot be resharded on load (reshard through
    converters.mcore2hf and converters.hf2mcore).
    """
    ckpt = _open_matching(ckpt_dir, iteration, spec, tp, pp, vpp)
    if ckpt.lora is None:
        _fill(chunks, ckpt, adapters=False)
    else:
        base_path, base_iteration = ckpt.lora.resolve_base(base_dir)
        base = _open_matching(base_path, base_iteration, spec, tp, pp, vpp)
        if base.lora is not None:
            raise CheckpointError(
                f"{base.iter_dir}, the base of the adapters in {ckpt.iter_dir}, is itself an "
                "adapter checkpoint; give the full checkpoint the adapters were trained on"
            )
        _fill(chunks, base, adapters=False)
        _fill(chunks, ckpt, adapters=True)
        log.info("loaded base weights from %s", base.iter_dir)
    log.info("loaded model weights from %s", ckpt.iter_dir)
    return ckpt


# --- training checkpoints --------------------------------------------------------------------
#
# A save is all-or-nothing: every rank writes into `<save>/.partial_iter_XXXXXXX`, files are
# fsynced, then rank 0 renames the directory to `iter_XXXXXXX` and only then updates the tracker
# file (itself written to a temporary name and renamed). A crash at any point leaves the tracker
# on the previous complete checkpoint. `save` must be on a filesystem all nodes share.

DISTRIB_OPTIM_FILE = "distrib_optim.pt"


@dataclass
class TrainState:
    """Where training stands: what a resumed run needs besides weights and optimizer."""

    iteration: int = 0
    consumed_samples: int = 0


def _rng_state() -> dict[str, Any]:
    """This rank's RNG streams as plain Python values (bytes, not tensors), so they can be
    gathered across ranks as objects and saved without pickled tensors."""
    from megatron.core import tensor_parallel

    name, keys, *rest = np.random.get_state()
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    return {
        "random": random.getstate(),
        "np": [name, keys.tobytes(), *rest],
        "torch": torch.get_rng_state().numpy().tobytes(),
        "tracker": {k: v.cpu().numpy().tobytes() for k, v in tracker.items()},
    }


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    name, keys, *rest = state["np"]
    np.random.set_state((name, np.frombuffer(keys, dtype=np.uint32).copy(), *rest))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {k: _bytes_tensor(v) for k, v in state["tracker"].items()}
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_training_checkpoint(
    save_dir: str | Path,
    state: TrainState,
    model: list,
    optimizer,
    scheduler,
    args: argparse.Namespace,
    keep_last: int | None,
    adapters_only: bool = False,
) -> Path:
    """Collective: every rank calls it. Returns the final iteration directory.

    With `adapters_only` (LoRA) the model state is the adapters alone; `args` must then name
    the base checkpoint (see mtrain.lora.AdapterCheckpointInfo)."""
    from megatron.core import parallel_state as ps

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

    # RNG states of every DP rank, so a resumed run continues each rank's stream.
    rng = [None] * ps.get_data_parallel_world_size()
    torch.distributed.all_gather_object(rng, _rng_state(), group=ps.get_data_parallel_group())
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    pp = ps.get_pipeline_model_parallel_world_size()
    path = rank_file(partial, tp_rank, pp_rank, pp)
    distributed = getattr(optimizer.config, "use_distributed_optimizer", False)
    if distributed:  # collective over the DP group; DP rank 0 writes
        path.parent.mkdir(parents=True, exist_ok=True)
        optimizer.save_parameter_state(str(path.parent / DISTRIB_OPTIM_FILE))
    if ps.get_data_parallel_rank() == 0:
        args = argparse.Namespace(
            **vars(args), iteration=state.iteration, consumed_train_samples=state.consumed_samples
        )
        payload = {
            "args": args,
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": state.iteration,
            "optimizer": optimizer.state_dict(),
            "opt_param_scheduler": scheduler.state_dict(),
            "rng_state": rng,
        }
        unwrapped = [getattr(m, "module", m) for m in model]
        states = [adapter_state_dict(m) if adapters_only else m.state_dict() for m in unwrapped]
        if len(states) == 1:
            payload["model"] = states[0]
        else:
            payload.update({f"model{i}": s for i, s in enumerate(states)})
        save_rank_file(path, payload)
        for written in path.parent.iterdir():
            _fsync(written)
    torch.distributed.barrier()

    if rank == 0:
        if final.exists():  # re-saving an iteration: the new copy replaces the old one
            shutil.rmtree(final)
        partial.rename(final)
        tracker_tmp = save_dir / f".{TRACKER}.tmp"
        tracker_tmp.write_text(f"{state.iteration}\n")
        _fsync(tracker_tmp)
        tracker_tmp.rename(save_dir / TRACKER)
        _fsync(save_dir)
        if keep_last is not None:
            saved = sorted(p for p in save_dir.glob("iter_*") if p.is_dir())
            for old in saved[:-keep_last]:
                shutil.rmtree(old)
        log.info("saved checkpoint %s", final)
    torch.distributed.barrier()
    return final


@torch.no_grad()  # in fp32 the optimizer's main params are the model params themselves
def load_training_checkpoint(
    load_dir: str | Path,
    model: list,
    optimizer,
    scheduler,
    spec: ModelSpec,
    tp: int,
    pp: int,
    vpp: int,
    base_dir: str | Path | None = None,
) -> TrainState:
    """Collective: resume weights, optimizer, scheduler, RNG and data position (`base_dir`:
    where an adapter checkpoint's base is, if not where it was)."""
    from megatron.core import parallel_state as ps

    ckpt = load_model_weights(model, load_dir, spec, tp, pp, vpp, base_dir=base_dir)
    payload = load_rank_file(
        ckpt.rank_file(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()),
        mmap=False,
    )
    if "optimizer" not in payload:
        raise CheckpointError(
            f"{ckpt.iter_dir} holds weights only (no optimizer state); to "
            "start training from it pass checkpoint.finetune=true"
        )
    optimizer.load_state_dict(payload["optimizer"])
    if getattr(optimizer.config, "use_distributed_optimizer", False):
        shard_file = (
            ckpt.rank_file(
                ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
            ).parent
            / DISTRIB_OPTIM_FILE
        )
        if not shard_file.is_file():
            raise CheckpointError(
                f"{shard_file} not found: the checkpoint was saved without "
                "parallel.distributed_optimizer=true; resume with the same setting"
            )
        compat.load_distributed_optimizer_state(optimizer, str(shard_file))
    scheduler.load_state_dict(payload["opt_param_scheduler"])
    rng = payload.get("rng_state")
    if rng is not None and len(rng) == ps.get_data_parallel_world_size():
        _set_rng_state(rng[ps.get_data_parallel_rank()])
    args = payload["args"]
    return TrainState(
        iteration=int(payload["iteration"]),
        consumed_samples=int(getattr(args, "consumed_train_samples", 0)),
    )
