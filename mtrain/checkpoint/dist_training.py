"""Training checkpoints in megatron-core's distributed format: `checkpoint.format=torch_dist`.

A save holds what a legacy one holds (training.py), in the layout megatron-core's
`dist_checkpointing` gives it (see dist_format.py), so that a run resumes at another TP x PP x DP
and Megatron-LM's tools read it:

- the model: each chunk's sharded state dict, at global shapes;
- the optimizer: megatron-core's sharded optimizer state (for the distributed optimizer its
  `fully_sharded_model_space` layout), which reshards like the weights;
- common.pt: `args` (with iteration and consumed_train_samples), checkpoint_version, iteration
  and the scheduler state;
- `rng_state`: every DP rank's RNG streams, one object per (PP, TP) rank. They are restored only
  when the run resumes at the layout that saved them; at another layout the streams continue
  from this run's seed (they drive dropout only).

All ranks call `save_dist` and `load_dist` (collectives). The atomic directory handling, the
tracker and pruning stay with training.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mtrain import compat, parallel
from mtrain.checkpoint.atomic import fsync
from mtrain.checkpoint.layout import MegatronCheckpoint
from mtrain.checkpoint.rng import set_rng_state
from mtrain.models.provider import sharded_state_dicts

log = logging.getLogger("mtrain.checkpoint")


def dist_checkpointing() -> Any:
    """megatron-core's `dist_checkpointing`, with the workarounds it needs here applied."""
    from megatron.core import dist_checkpointing as module

    compat.pass_dcp_serialization_format()
    compat.tolerate_numpy2_in_dist_checkpointing()
    return module


def load_dist_weights(chunks: list, ckpt: MegatronCheckpoint) -> list[dict[str, Any]]:
    """The state dict of each of this rank's chunks, read from a torch_dist checkpoint at this
    run's layout (all ranks); the caller fills the chunks."""
    model = sharded_state_dicts(chunks)
    loaded = dist_checkpointing().load(model, str(ckpt.iter_dir))
    return [loaded[k] for k in model]


def _rng_object(rng: list | None) -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state",
        rng,
        (parallel.pp_size(), parallel.tp_size()),
        (parallel.pp_rank(), parallel.tp_rank()),
        replica_id=parallel.replica_rank(),  # the same list on every DP x CP rank: one copy
    )


def save_dist(partial: Path, common: dict[str, Any], parts: Any, rng: list) -> None:
    """Write this rank's part of a torch_dist save into `partial` (all ranks)."""
    model = sharded_state_dicts(parts.model)
    state: dict[str, Any] = dict(model)
    state["optimizer"] = parts.optimizer.sharded_state_dict(model, is_loading=False)
    state["rng_state"] = _rng_object(rng)
    state.update(common)  # plain values: megatron-core writes them to common.pt (rank 0)
    dist_checkpointing().save(state, str(partial))
    rank = parallel.global_rank()
    for written in partial.glob(f"__{rank}_*.distcp"):
        fsync(written)
    if rank == 0:
        for name in ("common.pt", ".metadata", "metadata.json"):
            if (partial / name).is_file():
                fsync(partial / name)


def load_dist(ckpt: MegatronCheckpoint, parts: Any, fill: Any) -> dict[str, Any]:
    """Resume weights (through `fill(chunks, states, where)`), optimizer and scheduler (and
    the RNG streams at the saving layout) from a torch_dist checkpoint (all ranks); returns
    what common.pt holds."""
    args = ckpt.args
    saved = (*ckpt.saved_layout[:2], int(getattr(args, "data_parallel_size", 0) or 0))
    saved += (int(getattr(args, "context_parallel_size", 1) or 1),)
    here = (parallel.tp_size(), parallel.pp_size(), parallel.dp_size(), parallel.cp_size())
    model = sharded_state_dicts(parts.model)
    state: dict[str, Any] = dict(model)
    compat.optimizer_state_for_dist_load(parts.optimizer)
    state["optimizer"] = parts.optimizer.sharded_state_dict(model, is_loading=True)
    if saved == here:
        state["rng_state"] = _rng_object(None)
    loaded = dist_checkpointing().load(state, str(ckpt.iter_dir))
    fill(parts.model, [loaded[k] for k in model], f"{ckpt.iter_dir} (torch_dist)")
    compat.load_dist_optimizer_state(parts.optimizer, loaded["optimizer"])
    parts.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if saved == here:
        set_rng_state(loaded["rng_state"][parallel.replica_rank()])
    else:
        log.info(
            "%s was saved at tp=%d pp=%d dp=%d cp=%d, this run is tp=%d pp=%d dp=%d cp=%d: "
            "weights and "
            "optimizer resharded; the RNG streams continue from this run's seed",
            ckpt.iter_dir,
            *saved,
            *here,
        )
    return loaded
