"""Training straight from an HF model directory: `load=HF_DIR`, no conversion step.

Each rank reads exactly the bytes of its own slices (the converters' reader and layouts) straight
into its parameters, piece by piece, so no process ever holds more than its own shard of the
model and a few small buffers. The result is bit-identical to converting with converters.hf2mcore
first and loading that checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtrain import parallel
from mtrain.checkpoint.hf_io import HFReader
from mtrain.checkpoint.layout import TRACKER
from mtrain.checkpoint.weights import check_complete
from mtrain.errors import CheckpointError
from mtrain.models.score import SCORE_KEY
from mtrain.models.sharding import Dims, shard_into, shard_shape
from mtrain.models.spec import ModelSpec
from mtrain.models.stages import all_hf_tensors, stage_groups

# Tensors some HF checkpoints carry that are not weights of the model.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_hf_dir(path: str | Path) -> bool:
    """An HF model directory (config.json, no Megatron tracker)."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / TRACKER).is_file()


def hf_head(reader: HFReader) -> str:
    """`score` for an HF reward model (*ForSequenceClassification), else `lm`."""
    return "score" if SCORE_KEY in reader.weight_map else "lm"


def open_hf_reader(hf_dir: str | Path, spec: ModelSpec) -> HFReader:
    """A reader of an HF model directory; experts stacked into 3-D tensors per layer (as
    transformers 5 holds them in memory) are read as the one-tensor-per-expert checkpoints that
    `save_pretrained` and the hub have them."""
    from mtrain.models.families.base import HF_EXPERT_PREFIX, HF_LAYER_PREFIX

    reader = HFReader(hf_dir)
    for layer in range(spec.num_layers) if spec.is_moe else ():
        prefix = HF_LAYER_PREFIX.format(i=layer)
        for stacked, names in spec.family_table.stacked_experts:
            if prefix + stacked in reader.tensors:
                experts = [prefix + HF_EXPERT_PREFIX.format(e=e) for e in range(spec.num_experts)]
                reader.unstack(prefix + stacked, [[e + n for n in names] for e in experts])
    return reader


def check_hf_tensors(reader: HFReader, spec: ModelSpec, dims: Dims) -> None:
    """Every tensor the config implies exists with the right shape, and nothing else is there."""
    expected = all_hf_tensors(spec, hf_head(reader))
    with reader.session():
        for name, (entry, pos) in expected.items():
            want = dims.hf_shapes(entry)[pos]
            got = reader.shape(name)
            if got != want:
                raise CheckpointError(
                    f"{reader.dir}: tensor {name} has shape {list(got)} but "
                    f"config.json implies {list(want)}"
                )
    tied_head = spec.family_table.output.hf[0] if spec.tie_word_embeddings else None
    extra = sorted(
        n
        for n in reader.weight_map
        if n not in expected and n != tied_head and not n.endswith(IGNORED_SUFFIXES)
    )
    if extra:
        raise CheckpointError(
            f"{reader.dir}: tensor {extra[0]} (and {len(extra) - 1} more) is not "
            f"part of a {spec.family} model as config.json describes it"
        )


def load_hf_weights(
    chunks: list[torch.nn.Module],
    hf_dir: str | Path,
    spec: ModelSpec,
    tp: int,
    pp: int,
    vpp: int,
    ep: int = 1,
) -> None:
    """Fill this rank's chunks from the HF safetensors, strictly (every parameter, nothing
    else), reading only this rank's slices (its experts' with expert parallelism)."""
    reader = open_hf_reader(hf_dir, spec)
    dims = Dims.of(spec, tp)
    check_hf_tensors(reader, spec, dims)
    tp_rank, pp_rank = parallel.tp_rank(), parallel.pp_rank()
    ep_rank = parallel.ep_rank() if ep > 1 else 0
    where = f"{hf_dir} (tp rank {tp_rank}, pp rank {pp_rank}, ep rank {ep_rank})"
    for index, chunk in enumerate(chunks):
        model = getattr(chunk, "module", chunk)  # unwrap DDP
        params = model.state_dict(keep_vars=True)  # the parameters themselves, by name
        head = hf_head(reader)
        groups = stage_groups(spec, pp, vpp, pp_rank, index, ep, ep_rank, head=head)
        planned = [p for group in groups for p in group]
        fresh: tuple[str, ...] = ()
        if SCORE_KEY in params and head == "lm":  # a language model starting a reward model
            planned = [p for p in planned if p.entry is not spec.family_table.output]
            fresh = (SCORE_KEY,)
        names = {p.mcore for p in planned}
        missing = [k for k in params if k not in names]
        check_complete(missing, [n for n in names if n not in params], where, spec, fresh=fresh)
        with reader.session():
            for p in planned:
                param = params.get(p.mcore)
                if param is None:  # the tied output layer where the model shares the embedding
                    continue
                want = shard_shape(p.entry, dims)
                if tuple(param.shape) != want:
                    raise CheckpointError(
                        f"{where}: {p.mcore} is {list(param.shape)} in the model but "
                        f"{list(want)} from the HF tensors"
                    )
                shard_into(p.entry, p.hf, reader, tp_rank, dims, param.detach())
