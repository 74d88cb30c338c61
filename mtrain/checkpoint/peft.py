"""LoRA adapters on the way to HF: their layouts follow from the mapping table's entries.

An adapter on a linear the table describes (mtrain/lora.py explains the TP layout):
- column-like kinds (COLUMN, QKV, GATED_FC1): A is the same on every TP rank; B's rows are laid
  out exactly like the base weight's rows, so the table's own `merge` splits B back into the HF
  tensors (q/k/v de-interleaved with the GQA formula, gate/up de-fused), each with a copy of A.
- ROW: A's columns are split like the base's (cat along dim 1); B is the same on every rank.

PEFT names an adapter after the HF module it adapts: `base_model.model.<hf name>` with
`.weight` replaced by `.lora_A.weight` / `.lora_B.weight`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from mtrain.checkpoint.atomic import atomic_output_dir
from mtrain.checkpoint.layout import MegatronCheckpoint
from mtrain.errors import CheckpointError
from mtrain.models.families.base import HF_LAYER_PREFIX, MCORE_LAYER_PREFIX, Entry, Kind
from mtrain.models.sharding import Dims, merge, shard_shape
from mtrain.models.stages import piece_layers, stage_groups

log = logging.getLogger("mtrain.checkpoint")

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
_COLUMN_LIKE = (Kind.COLUMN, Kind.QKV, Kind.GATED_FC1)


def adapter_names(mcore_name: str) -> tuple[str, str]:
    """The state-dict names of the A and B matrices adapting `mcore_name` (a `.weight`)."""
    stem = mcore_name.removesuffix(".weight")
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"


def peft_names(hf_name: str) -> tuple[str, str]:
    stem = PEFT_PREFIX + hf_name.removesuffix(".weight")
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"


def peft_module(hf_name: str) -> str:
    """The module name PEFT matches in `target_modules` (e.g. q_proj)."""
    return hf_name.removesuffix(".weight").split(".")[-1]


def merge_adapter(
    entry: Entry, a_shards: list[torch.Tensor], b_shards: list[torch.Tensor], dims: Dims, where: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) for each HF tensor of `entry`, in table order, from the TP shards of one adapter."""
    replicated = b_shards if entry.kind is Kind.ROW else a_shards
    for t, other in enumerate(replicated[1:], start=1):
        if not torch.equal(replicated[0], other):
            raise CheckpointError(
                f"{where}: the replicated LoRA matrix differs between TP ranks 0 and {t}; "
                "the adapter checkpoint is inconsistent"
            )
    if entry.kind is Kind.ROW:
        return [(torch.cat(a_shards, dim=1), b_shards[0].clone())]
    if entry.kind not in _COLUMN_LIKE:
        raise AssertionError(entry.kind)
    return [(a_shards[0].clone(), b) for b in merge(entry, b_shards, dims)]


def adapter_targets(ckpt: MegatronCheckpoint) -> list[Entry]:
    """The layer entries an adapter checkpoint adapts, in its args' order."""
    entries = ckpt.spec.family_table.lora_targets
    return [entries[t] for t in ckpt.lora.config.target_modules]


def _piece_prefixes(ckpt: MegatronCheckpoint, pp_rank: int, chunk: int) -> list[tuple[int, str]]:
    """(global layer, local state-dict prefix) of each layer of one piece."""
    layers = piece_layers(ckpt.spec, ckpt.pp, ckpt.vpp, pp_rank, chunk)
    return [(layer, MCORE_LAYER_PREFIX.format(i=local)) for local, layer in enumerate(layers)]


def is_adapted(mcore_name: str, targets: set[str] | list[str]) -> bool:
    """Whether a LoRA run with `target_modules=targets` adapts the Megatron weight `mcore_name`
    (every routed expert's linears included)."""
    return mcore_name.endswith(".weight") and mcore_name[: -len(".weight")].rsplit(".", 1)[-1] in (
        targets
    )


def check_adapter_states(ckpt: MegatronCheckpoint) -> None:
    """Every rank file of an adapter checkpoint holds exactly the adapters its args imply, with
    A of shape (r, base columns) and B of shape (base rows, r) on each rank."""
    dims, r, targets = (
        Dims.of(ckpt.spec, ckpt.tp),
        ckpt.lora.config.r,
        ckpt.lora.config.target_modules,
    )
    for pp_rank in range(ckpt.pp):
        for tp_rank in range(ckpt.tp):
            for ep_rank in range(ckpt.ep):
                path = ckpt.rank_file(tp_rank, pp_rank, ep_rank)
                states = ckpt.load_model_states(tp_rank, pp_rank, ep_rank)
                for chunk, state in enumerate(states):
                    expected = {}
                    groups = stage_groups(
                        ckpt.spec, ckpt.pp, ckpt.vpp, pp_rank, chunk, ckpt.ep, ep_rank
                    )
                    for p in (p for g in groups for p in g if is_adapted(p.mcore, targets)):
                        rows, cols = shard_shape(p.entry, dims)
                        a_name, b_name = adapter_names(p.mcore)
                        expected[a_name], expected[b_name] = (r, cols), (rows, r)
                    if ckpt.head == "score" and (pp_rank, chunk) == (ckpt.pp - 1, ckpt.vpp - 1):
                        score = ckpt.spec.family_table.score  # trained beside the adapters
                        expected[score.mcore] = shard_shape(score, dims)
                    _check_names(path, state, expected)


def _check_names(path: Path, state, expected: dict[str, tuple[int, int]]) -> None:
    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(f"{path}: adapter tensor {name} is missing")
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"{path}: {name} has shape {list(state[name].shape)} but the "
                f"checkpoint args imply {list(shape)}"
            )
    extra = sorted(k for k in state if k not in expected)
    if extra:
        raise CheckpointError(f"{path}: {extra[0]} is not an adapter the checkpoint args describe")


def peft_config(ckpt: MegatronCheckpoint, base_model: str) -> dict:
    """adapter_config.json for PEFT's LoraConfig."""
    lora = ckpt.lora.config
    entries = ckpt.spec.family_table.lora_targets
    modules = sorted({peft_module(n) for t in lora.target_modules for n in entries[t].hf})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.rslora,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def write_peft_adapter(
    ckpt: MegatronCheckpoint,
    out_dir: Path,
    hf_dir: str | None,
    force: bool,
    dtype: torch.dtype | None,
    into_checkpoint: bool = False,
) -> None:
    """The adapters of `ckpt` as a PEFT LoRA adapter for the original HF model (`out_dir` may be
    inside the checkpoint only with `into_checkpoint`, see hf_export.export_hf)."""
    from safetensors.torch import save_file

    mlp = sorted({"linear_fc1", "linear_fc2"} & set(ckpt.lora.config.target_modules))
    if ckpt.spec.is_moe and mlp:
        raise CheckpointError(
            f"{ckpt.iter_dir}: a PEFT adapter cannot carry LoRA on {', '.join(mlp)} of an MoE "
            "model: transformers holds each layer's experts as 3-D tensors, not linears, so "
            "peft cannot load adapters on them; export the merged model instead "
            "(lora.merge=true / checkpoint.save_hf_lora=merged), or train LoRA on "
            "linear_qkv and linear_proj only"
        )
    start = time.perf_counter()
    dims, targets = Dims.of(ckpt.spec, ckpt.tp), adapter_targets(ckpt)
    tensors: dict[str, torch.Tensor] = {}
    for pp_rank in range(ckpt.pp):
        states = [ckpt.load_model_states(t, pp_rank) for t in range(ckpt.tp)]
        for chunk in range(ckpt.vpp):
            for layer, prefix in _piece_prefixes(ckpt, pp_rank, chunk):
                for entry in targets:
                    a_name, b_name = adapter_names(prefix + entry.mcore)
                    pairs = merge_adapter(
                        entry,
                        [s[chunk][a_name] for s in states],
                        [s[chunk][b_name] for s in states],
                        dims,
                        where=f"{ckpt.rank_file(0, pp_rank)}: {a_name}",
                    )
                    for hf, (a, b) in zip(entry.hf, pairs):
                        pa, pb = peft_names(HF_LAYER_PREFIX.format(i=layer) + hf)
                        tensors[pa] = (a if dtype is None else a.to(dtype)).contiguous()
                        tensors[pb] = (b if dtype is None else b.to(dtype)).contiguous()
        del states
    base_model = str(Path(hf_dir).resolve()) if hf_dir else ""
    inputs = [] if into_checkpoint else [ckpt.iter_dir.parent]
    inputs += [Path(hf_dir)] if hf_dir else []
    with atomic_output_dir(out_dir, force, inputs) as temp:
        save_file(tensors, temp / PEFT_WEIGHTS, metadata={"format": "pt"})
        config = peft_config(ckpt, base_model)
        (temp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info(
        "PEFT adapter (%d tensors, r=%d) from %s in %.1fs -> %s",
        len(tensors),
        ckpt.lora.config.r,
        ckpt.iter_dir,
        time.perf_counter() - start,
        out_dir,
    )
