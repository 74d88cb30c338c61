"""A Megatron checkpoint -> an HF model directory, one layer at a time.

The one exporter: `converters.mcore2hf` and training's `checkpoint.save_hf` both come here.

LoRA adapter checkpoints: with `merge_lora` (the default) the base is written with the adapters
merged (W + s B A per TP shard, in fp32, cast back to the base dtype); without it, a PEFT adapter
(adapter_model.safetensors + adapter_config.json) for the original HF model. The base checkpoint
is the one recorded in the adapters' args unless `base_dir` says otherwise.

Rank files are memory-mapped and reopened once the tensors read from them add up to the
largest HF shard being written (at least MIN_REOPEN_BYTES), so the resident memory stays within
the largest output file plus one layer. (Not per layer: opening a file unpickles the metadata
of every tensor in it, and an MoE rank file holds thousands.) With `hf_dir` the config,
tokenizer and generation files are copied from the original model; without it `config.json`
is written from the checkpoint args (and `tokenizer_dir`, if given, supplies the tokenizer
files).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed

from mtrain.checkpoint.atomic import atomic_output_dir, check_output_dir
from mtrain.checkpoint.hf_io import DEFAULT_MAX_SHARD_BYTES, HFShardedWriter
from mtrain.checkpoint.hf_weights import is_hf_dir
from mtrain.checkpoint.layout import MegatronCheckpoint
from mtrain.checkpoint.peft import (
    adapter_names,
    check_adapter_states,
    is_adapted,
    write_peft_adapter,
)
from mtrain.dtypes import DTYPE_NAMES, parse_dtype
from mtrain.errors import CheckpointError, ConfigError
from mtrain.lora import merged_weight
from mtrain.models.sharding import Dims, merge, shard_shape
from mtrain.models.spec import hf_config_from_spec, load_hf_config
from mtrain.models.stages import stage_groups

if TYPE_CHECKING:
    from mtrain.config.schema import TrainingCommandConfig

log = logging.getLogger("mtrain.checkpoint")

MIN_REOPEN_BYTES = 512 * 1024**2

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
_WEIGHT_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
)  # fmt: skip


def plan_hf_tensors(
    ckpt: MegatronCheckpoint,
    dims: Dims,
    dtype: torch.dtype | None,
    adapters: MegatronCheckpoint | None = None,
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(HF name, dtype, shape) of every output tensor, in the order they will be produced.

    Checks on the way that each stage holds exactly the tensors its args imply. Only the TP-rank-0
    files are opened, and only their metadata is touched. With `adapters` of a reward model, its
    score head comes from them and the base's LM head is left out.
    """
    spec, family = ckpt.spec, ckpt.spec.family_table
    head = (adapters or ckpt).head
    plan = []
    for pp_rank in range(ckpt.pp):
        per_ep = [ckpt.load_model_states(0, pp_rank, r) for r in range(ckpt.ep)]
        for chunk in range(len(per_ep[0])):
            for ep_rank, states in enumerate(per_ep):
                groups = stage_groups(
                    spec, ckpt.pp, ckpt.vpp, pp_rank, chunk, ckpt.ep, ep_rank, head=head
                )
                known = {p.mcore for g in groups for p in g}
                if (spec.tie_word_embeddings and head == "lm") or head != ckpt.head:
                    known.add(family.output.mcore)  # a tied copy some tools write, or not; a base's
                path = ckpt.rank_file(0, pp_rank, ep_rank)
                unknown = sorted(
                    k for k in states[chunk] if k not in known and not k.endswith("._extra_state")
                )
                if unknown:
                    raise CheckpointError(
                        f"{path}: tensor {unknown[0]} (and {len(unknown) - 1} more) is not part "
                        f"of a {spec.family} model as the checkpoint args describe it"
                    )
            for group in stage_groups(
                spec, ckpt.pp, ckpt.vpp, pp_rank, chunk, ckpt.ep, None, head=head
            ):
                for p in group:
                    if p.entry is family.output and spec.tie_word_embeddings:
                        continue
                    state = per_ep[p.ep_rank or 0][chunk]
                    if p.entry is family.score and head != ckpt.head:
                        state = adapters.load_model_states(0, pp_rank)[chunk]
                    if p.mcore not in state:
                        path = ckpt.rank_file(0, pp_rank, p.ep_rank or 0)
                        raise CheckpointError(f"{path}: tensor {p.mcore} is missing")
                    dtype_of = getattr(state, "dtype_of", None)  # torch_dist: without reading
                    found = dtype_of(p.mcore) if dtype_of else state[p.mcore].dtype
                    for name, shape in zip(p.hf, dims.hf_shapes(p.entry)):
                        plan.append((name, dtype or found, shape))
        del per_ep
    return plan


def copy_side_files(hf_dir: Path, out: Path, dtype: torch.dtype | None) -> None:
    """Copy config, tokenizer, generation config and other small files; never weights."""
    for src in sorted(hf_dir.iterdir()):
        if (
            src.is_file()
            and not src.name.endswith(_WEIGHT_SUFFIXES)
            and src.name not in _WEIGHT_NAMES
        ):
            shutil.copy2(src, out / src.name)
    config = out / "config.json"
    if dtype is not None and config.is_file():
        data = json.loads(config.read_text())
        data["torch_dtype" if "torch_dtype" in data else "dtype"] = DTYPE_NAMES[dtype]
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _copy_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)


def _open_base(adapters: MegatronCheckpoint, base_dir: str | None) -> MegatronCheckpoint:
    path, iteration = adapters.lora.resolve_base(base_dir)
    base = MegatronCheckpoint.open(path, iteration)
    if base.lora is not None:
        raise ConfigError(f"base_dir={path} holds adapters too; give the full base checkpoint")
    if base.format == "torch_dist" and (adapters.tp, adapters.pp, adapters.vpp) != (1, 1, 1):
        raise ConfigError(
            f"the adapters' base {path} is a torch_dist checkpoint, and merging needs the base "
            f"at the adapters' layout (tp={adapters.tp} pp={adapters.pp}); export a PEFT adapter "
            "instead (lora.merge=false), or merge against the base converted with "
            "converters.hf2mcore at that layout (base_dir=)"
        )
    if base.spec != adapters.spec or (base.tp, base.pp, base.vpp, base.ep) != (
        adapters.tp,
        adapters.pp,
        adapters.vpp,
        adapters.ep,
    ):
        raise ConfigError(
            f"base_dir={path} (tp={base.tp} pp={base.pp} ep={base.ep}) is not the model the "
            f"adapters in {adapters.iter_dir} (tp={adapters.tp} pp={adapters.pp} "
            f"ep={adapters.ep}) were trained on"
        )
    return base


def _check_hf_dir(hf_dir: str, ckpt: MegatronCheckpoint) -> None:
    hf_spec, _ = load_hf_config(hf_dir)
    mismatched = [k for k, v in vars(hf_spec).items() if getattr(ckpt.spec, k) != v]
    if mismatched:
        k = mismatched[0]
        raise ConfigError(
            f"hf_dir={hf_dir}: config.json has {k}={getattr(hf_spec, k)} "
            f"but the checkpoint has {k}={getattr(ckpt.spec, k)}; is it the right model?"
        )


def _reward_model_config(path: Path, ckpt: MegatronCheckpoint) -> None:
    """Turn a causal LM's config.json into its reward model's: the sequence-classification
    architecture with one label, and the pad id the reward is located by."""
    config = json.loads(path.read_text())
    config["architectures"] = [ckpt.spec.family_table.hf_reward_architecture]
    config["id2label"], config["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    config["num_labels"] = 1
    pad = getattr(ckpt.args, "pad_token_id", None)
    if pad is None:
        raise CheckpointError(f"{ckpt.iter_dir}: a reward model whose args lack pad_token_id")
    config["pad_token_id"] = int(pad)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    iteration: str | None = None,
    hf_dir: str | None = None,
    tokenizer_dir: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    base_dir: str | None = None,
    merge_lora: bool = True,
    into_checkpoint: bool = False,
) -> Path:
    """Write the HF model of checkpoint `ckpt_dir` (its `iteration`; default the tracker's) into
    `out_dir`, which must be empty or absent unless `force`; all or nothing. An `out_dir` inside
    the checkpoint is refused unless `into_checkpoint` (training's export into the iteration
    directory it has just completed)."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not into_checkpoint:
        check_output_dir(out_dir, force, [ckpt_dir])
    ckpt = MegatronCheckpoint.open(ckpt_dir, iteration)
    adapters = None
    if ckpt.lora is not None:
        check_adapter_states(ckpt)
        if not merge_lora:
            if ckpt.head == "score":
                raise ConfigError(
                    f"{ckpt.iter_dir} holds a reward model's adapters and score head, which "
                    "PEFT cannot hold as an adapter; export it merged (lora.merge=true)"
                )
            write_peft_adapter(ckpt, out_dir, hf_dir, force, dtype, into_checkpoint)
            return out_dir
        adapters, ckpt = ckpt, _open_base(ckpt, base_dir)
    elif base_dir is not None:
        raise ConfigError(
            f"base_dir= is for LoRA adapter checkpoints, but {ckpt.iter_dir} is a full checkpoint"
        )
    spec = ckpt.spec
    inputs = [] if into_checkpoint else [ckpt_dir]
    inputs += [ckpt.iter_dir.parent] if adapters else []
    if hf_dir is not None:
        _check_hf_dir(hf_dir, ckpt)
        inputs.append(Path(hf_dir))
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_size_gb={max_shard_bytes / 1000**3} must be positive")
    dims = Dims.of(spec, ckpt.tp)

    start = time.perf_counter()
    tp, pp = ckpt.saved_layout[:2] if ckpt.saved_layout else (ckpt.tp, ckpt.pp)
    log.info(
        "HF export: %s (%s, %s, tp=%d pp=%d)%s -> %s",
        ckpt.iter_dir,
        spec.family,
        ckpt.format,
        tp,
        pp,
        f" + LoRA {adapters.iter_dir} merged" if adapters else "",
        out_dir,
    )
    plan = plan_hf_tensors(ckpt, dims, dtype, adapters)
    head = (adapters or ckpt).head
    targets = set(adapters.lora.config.target_modules) if adapters is not None else set()
    with atomic_output_dir(out_dir, force, inputs) as temp:
        writer = HFShardedWriter(temp, plan, max_shard_bytes)
        states: dict[int, list] = {}  # this stage's rank files by EP rank, memory-mapped
        touched = 0  # bytes read from them since they were opened
        reopen = max(MIN_REOPEN_BYTES, writer.largest_bytes - MIN_REOPEN_BYTES)
        for pp_rank in range(ckpt.pp):
            for chunk in range(ckpt.vpp):
                lora_states = None  # small: read once per piece
                if adapters is not None:
                    lora_states = {
                        (t, r): adapters.load_model_states(t, pp_rank, r)[chunk]
                        for t in range(ckpt.tp)
                        for r in range(ckpt.ep)
                    }
                for group in stage_groups(
                    spec, ckpt.pp, ckpt.vpp, pp_rank, chunk, ckpt.ep, None, head=head
                ):
                    if touched > reopen:  # unmapping bounds the resident memory
                        states, touched = {}, 0
                    for p in group:
                        if p.entry is spec.family_table.output and spec.tie_word_embeddings:
                            continue  # the tied copy on the last stage; the embedding is the truth
                        r = p.ep_rank or 0
                        if p.entry is spec.family_table.score and head != ckpt.head:
                            # trained beside the adapters, saved with them
                            shards = [lora_states[t, 0][p.mcore] for t in range(ckpt.tp)]
                        else:
                            if r not in states:
                                states[r] = [
                                    ckpt.load_model_states(t, pp_rank, r)[chunk]
                                    for t in range(ckpt.tp)
                                ]
                            shards = [s[p.mcore] for s in states[r]]
                            touched += sum(t.numel() * t.element_size() for t in shards)
                        want = shard_shape(p.entry, dims)
                        for t, s in enumerate(shards):
                            if tuple(s.shape) != want:
                                raise CheckpointError(
                                    f"{ckpt.rank_file(t, pp_rank, r)}: {p.mcore} has shape "
                                    f"{list(s.shape)} but the checkpoint args imply {list(want)}"
                                )
                        if is_adapted(p.mcore, targets):
                            a_name, b_name = adapter_names(p.mcore)
                            scaling = adapters.lora.config.scaling
                            shards = [
                                merged_weight(w, ls[a_name], ls[b_name], scaling)
                                for w, ls in zip(
                                    shards, (lora_states[t, r] for t in range(ckpt.tp))
                                )
                            ]
                        for name, tensor in zip(p.hf, merge(p.entry, shards, dims)):
                            writer.add(name, tensor if dtype is None else tensor.to(dtype))
                states, touched = {}, 0  # the next stage or chunk: other files or entries
        files = writer.finish()
        if hf_dir is not None:
            copy_side_files(Path(hf_dir), temp, dtype)
        else:
            config = hf_config_from_spec(spec, DTYPE_NAMES.get(plan[0][1], "bfloat16"))
            (temp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if tokenizer_dir is not None:
                _copy_tokenizer(Path(tokenizer_dir), temp)
        if head == "score":
            _reward_model_config(temp / "config.json", adapters or ckpt)
    log.info(
        "HF export: done in %.1fs, %d file(s), %.2f GB -> %s",
        time.perf_counter() - start,
        len(files),
        writer.total_bytes / 1e9,
        out_dir,
    )
    return out_dir


def export_run_checkpoint(saved: Path, cfg: TrainingCommandConfig) -> None:
    """checkpoint.save_hf: rank 0 writes the HF model of the checkpoint just saved into its
    `hf` folder, layer by layer from the files on disk; the other ranks wait."""
    if torch.distributed.get_rank() == 0:
        ck, hf_dir = cfg.checkpoint, cfg.model.hf_dir
        if hf_dir is None and cfg.load is not None and is_hf_dir(cfg.load):
            hf_dir = cfg.load
        if hf_dir is None:
            log.warning(
                "checkpoint.save_hf: model.hf_dir is not given, so %s/hf gets a config.json "
                "written from the model's settings and no tokenizer files",
                saved,
            )
        export_hf(
            saved.parent,
            saved / "hf",
            iteration=saved.name.removeprefix("iter_"),
            hf_dir=hf_dir,
            dtype=parse_dtype(ck.save_hf_dtype),
            merge_lora=ck.save_hf_lora == "merged",
            into_checkpoint=True,
        )
        log.info("HF model of iteration %s written to %s", saved.name, saved / "hf")
    torch.distributed.barrier()
