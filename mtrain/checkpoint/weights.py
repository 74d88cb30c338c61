"""Filling a run's model chunks from a checkpoint, strictly: every parameter, nothing else."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mtrain import parallel
from mtrain.checkpoint.dist_training import load_dist_weights
from mtrain.checkpoint.layout import MegatronCheckpoint
from mtrain.errors import CheckpointError
from mtrain.lora import is_adapter_key
from mtrain.models.score import SCORE_KEY
from mtrain.models.spec import ModelSpec

log = logging.getLogger("mtrain.checkpoint")


def open_matching(
    ckpt_dir: str | Path,
    iteration: str | None,
    spec: ModelSpec,
    tp: int,
    pp: int,
    vpp: int,
    ep: int = 1,
) -> MegatronCheckpoint:
    """Open a checkpoint that must hold this run's model at this run's layout."""
    ckpt = MegatronCheckpoint.open(Path(ckpt_dir), iteration)
    for key, value in vars(spec).items():
        if getattr(ckpt.spec, key) != value:
            raise CheckpointError(
                f"{ckpt.iter_dir}: checkpoint has {key}={getattr(ckpt.spec, key)}"
                f" but the model config has {key}={value}"
            )
    if ckpt.format == "legacy" and (ckpt.tp, ckpt.pp, ckpt.vpp, ckpt.ep) != (tp, pp, vpp, ep):
        at = f"tp={ckpt.tp} pp={ckpt.pp} vpp={ckpt.vpp}" + (f" ep={ckpt.ep}" if spec.is_moe else "")
        run = f"tp={tp} pp={pp} vpp={vpp}" + (f" ep={ep}" if spec.is_moe else "")
        raise CheckpointError(
            f"{ckpt.iter_dir} was written at {at} but this run uses {run}; reshard it with "
            f"converters.mcore2hf then converters.hf2mcore, or run with the checkpoint's layout"
        )
    return ckpt


def fill(
    chunks: list[torch.nn.Module],
    states: list[dict[str, torch.Tensor]],
    where: str,
    spec: ModelSpec,
    adapters: bool = False,
) -> None:
    """Load one state dict per chunk into this rank's chunks: every base parameter (or, with
    `adapters`, every LoRA adapter) must be there, and nothing else. `where` names the source
    in errors."""
    for chunk, state in zip(chunks, states):
        model = getattr(chunk, "module", chunk)  # unwrap DDP
        if adapters and not any(is_adapter_key(k) for k in model.state_dict()):
            raise CheckpointError(
                f"{where} holds LoRA adapters but the model has none: train with "
                "finetuning_type=lora, or merge them first (converters.mcore2hf lora.merge=true)"
            )
        fresh = ()
        if not adapters and SCORE_KEY in model.state_dict() and SCORE_KEY not in state:
            # A language model starting a reward model: its LM head goes, the score head
            # keeps its init (on the last stage; other stages have neither).
            state = {k: v for k, v in state.items() if not k.startswith("output_layer.")}
            fresh = (SCORE_KEY,)
            log.info("%s: a language model; the reward head starts from its init", where)
        missing, unexpected = model.load_state_dict(state, strict=False)
        check_complete(missing, unexpected, where, spec, adapters, fresh)


def check_complete(
    missing: list[str],
    unexpected: list[str],
    where: str,
    spec: ModelSpec,
    adapters: bool = False,
    fresh: tuple[str, ...] = (),
) -> None:
    """Refuse a load that leaves out a base parameter (or, with `adapters`, an adapter) of the
    model or brings a tensor it lacks: a model built without initialisation relies on it.
    `fresh` names parameters that may keep their init (a reward head on a language model)."""
    tied_copy = spec.family_table.output.mcore if spec.tie_word_embeddings else None
    missing = [
        k
        for k in missing
        if not k.endswith("._extra_state") and is_adapter_key(k) == adapters and k not in fresh
    ]
    unexpected = [k for k in unexpected if k != tied_copy]
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has unexpected {unexpected[0]}"
        raise CheckpointError(
            f"{where} {what} ({len(missing)} missing, {len(unexpected)} unexpected tensors)"
        )


def _fill(chunks: list[torch.nn.Module], ckpt: MegatronCheckpoint, adapters: bool) -> None:
    if ckpt.format == "torch_dist":  # collective: megatron-core reshards to this layout
        states = load_dist_weights(chunks, ckpt)
        fill(chunks, states, f"{ckpt.iter_dir} (torch_dist)", ckpt.spec, adapters)
        return
    tp_rank, pp_rank = parallel.tp_rank(), parallel.pp_rank()
    ep_rank = parallel.ep_rank() if ckpt.ep > 1 else 0
    where = str(ckpt.rank_file(tp_rank, pp_rank, ep_rank))
    states = ckpt.load_model_states(tp_rank, pp_rank, ep_rank)
    fill(chunks, states, where, ckpt.spec, adapters)


def load_model_weights(
    chunks: list[torch.nn.Module],
    ckpt_dir: str | Path,
    spec: ModelSpec,
    tp: int,
    pp: int,
    vpp: int = 1,
    iteration: str | None = None,
    base_dir: str | Path | None = None,
    ep: int = 1,
) -> MegatronCheckpoint:
    """Load this rank's shard of a checkpoint into its model chunk(s), strictly.

    A full checkpoint fills every base parameter; adapters the model may have keep their init
    (a LoRA run starting). An adapter checkpoint first loads its base (`base_dir`, by default
    the one recorded in it), then fills every adapter. The checkpoint must have the run's model;
    a legacy one also the run's layout (it cannot be resharded on load: reshard through
    converters.mcore2hf and converters.hf2mcore), a torch_dist one is resharded (collective).
    """
    ckpt = open_matching(ckpt_dir, iteration, spec, tp, pp, vpp, ep)
    if ckpt.lora is None:
        _fill(chunks, ckpt, adapters=False)
    else:
        base_path, base_iteration = ckpt.lora.resolve_base(base_dir)
        base = open_matching(base_path, base_iteration, spec, tp, pp, vpp, ep)
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
