"""Loading (and, for training, saving) model state in the Megatron legacy format."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mtrain.checkpoint_format import MegatronCheckpoint
from mtrain.errors import CheckpointError
from mtrain.models.spec import ModelSpec

log = logging.getLogger("mtrain.checkpoint")


def load_model_weights(
    chunks: list[torch.nn.Module],
    ckpt_dir: str | Path,
    spec: ModelSpec,
    tp: int,
    pp: int,
    vpp: int = 1,
    iteration: str | None = None,
) -> MegatronCheckpoint:
    """Load this rank's shard of a checkpoint into its model chunk(s), strictly.

    The checkpoint must have the run's model and layout: the legacy format cannot be resharded
    on load (reshard through converters.mcore2hf and converters.hf2mcore).
    """
    from megatron.core import parallel_state

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
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    path = ckpt.rank_file(tp_rank, pp_rank)
    tied_copy = spec.family_table.output.mcore if spec.tie_word_embeddings else None
    for chunk, state in zip(chunks, ckpt.load_model_states(tp_rank, pp_rank)):
        model = getattr(chunk, "module", chunk)  # unwrap DDP
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("._extra_state")]
        unexpected = [k for k in unexpected if k != tied_copy]
        if missing or unexpected:
            what = f"lacks {missing[0]}" if missing else f"has unexpected {unexpected[0]}"
            raise CheckpointError(
                f"{path} {what} ({len(missing)} missing, {len(unexpected)} unexpected tensors)"
            )
    log.info("loaded model weights from %s", ckpt.iter_dir)
    return ckpt
