"""The Megatron legacy checkpoint layout (`--ckpt-format torch`), shared by converters and trainer.

    <dir>/latest_checkpointed_iteration.txt      "release" or an iteration number
    <dir>/release/ or <dir>/iter_0000100/
        mp_rank_{tp:02d}/model_optim_rng.pt          when PP == 1
        mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt when PP > 1
        ..._{ep:03d} appended with expert parallelism (EP > 1), as Megatron-LM names them:
        mp_rank_{tp:02d}_{ep:03d} (PP == 1), mp_rank_{tp:02d}_{pp:03d}_{ep:03d} (PP > 1); each
        EP rank's file holds its experts and a copy of every other tensor

Each file is a `torch.save`d dict with `args` (argparse.Namespace, Megatron-LM argument names,
see mtrain.checkpoint.args), `checkpoint_version`, `iteration` and `model` (the rank's state
dict), plus optimizer, scheduler and RNG state when written by training. MindSpeed-LLM and
Megatron-LM read and write this layout.

`MegatronCheckpoint` also opens megatron-core's distributed format (torch_dist, see
dist_format.py) for reading, presented as a TP1 x PP1 checkpoint whatever layout wrote it.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtrain.checkpoint.adapters import AdapterCheckpointInfo
from mtrain.checkpoint.args import expert_layout_of, spec_from_megatron_args
from mtrain.checkpoint.atomic import atomic_write
from mtrain.checkpoint.dist_format import COMMON, DistModelState, DistReader, is_dist_checkpoint
from mtrain.checkpoint.unpickle import load_restricted
from mtrain.errors import CheckpointError
from mtrain.models.experts import SequentialExperts
from mtrain.models.spec import ModelSpec

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
RELEASE = "release"


ITER_DIR = re.compile(r"iter_(\d{7,})")  # what `iteration_dir_name` writes for a number


def iteration_dir_name(iteration: int | str) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def rank_dir_name(
    tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1
) -> str:
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep_size == 1 else f"{name}_{ep_rank:03d}"


def rank_file(
    iter_dir: Path, tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1
) -> Path:
    return iter_dir / rank_dir_name(tp_rank, pp_rank, pp_size, ep_rank, ep_size) / RANK_FILE


def read_tracker(ckpt_dir: Path) -> int | str:
    """The iteration named by the tracker file: an int, or "release"."""
    tracker = ckpt_dir / TRACKER
    if not tracker.is_file():
        raise CheckpointError(
            f"{tracker} not found; ckpt_dir must be a Megatron checkpoint directory "
            "(written by mtrain, hf2mcore, MindSpeed-LLM or Megatron-LM)"
        )
    try:
        text = tracker.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(
            f"{tracker}: not text; it should hold 'release' or an iteration number"
        ) from None
    return parse_iteration(text, str(tracker))


def parse_iteration(value: int | str, source: str) -> int | str:
    """An iteration as a tracker or an `iteration=` key gives it: "release" or an integer >= 0."""
    text = str(value).strip()
    if text == RELEASE:
        return RELEASE
    try:
        number = int(text)
    except ValueError:
        number = -1
    if number < 0:
        raise CheckpointError(f"{source}: expected 'release' or an integer, got {text!r}")
    return number


def write_tracker(ckpt_dir: Path, iteration: int | str) -> None:
    """Point the tracker at `iteration`; atomic, so a reader sees the old or the new one."""
    atomic_write(ckpt_dir / TRACKER, f"{iteration}\n")


def load_checkpoint_file(path: Path, mmap: bool = True) -> Any:
    """A torch checkpoint file without unpickling arbitrary objects: every file mtrain opens,
    or hands to megatron-core, comes through here. torch's `weights_only` loader first (it can
    memory-map: with `mmap` tensors are paged in only when touched); what it cannot read, a
    pickle protocol it does not parse (MindSpeed-LLM saves with protocol 4) or the numpy RNG
    state Megatron-LM stores, goes to mtrain's own allowlist unpickler (checkpoint/unpickle.py),
    which refuses anything else by name."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found; the checkpoint is incomplete")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # "Detected pickle protocol 4": the fallback below is the answer to that
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        return load_restricted(path)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot be read as a checkpoint file ({err})") from None


def load_rank_file(path: Path, mmap: bool = True) -> dict[str, Any]:
    """One rank file: a dict whose `args` (an argparse.Namespace; a plain dict is taken too)
    describe the model and the layout."""
    payload = load_checkpoint_file(path, mmap)
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{path}: holds a {type(payload).__name__}, not a Megatron rank file (a dict with "
            "'args' and 'model')"
        )
    args = payload.get("args")
    if isinstance(args, dict):
        payload["args"] = argparse.Namespace(**args)
    elif not isinstance(args, argparse.Namespace):
        raise CheckpointError(
            f"{path}: has no 'args' (the model and layout Megatron-LM, MindSpeed-LLM and mtrain "
            "record); it is not a Megatron rank file"
        )
    return payload


def save_rank_file(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


@dataclass
class MegatronCheckpoint:
    """An opened checkpoint: where its rank files are and what model they hold."""

    iter_dir: Path
    spec: ModelSpec
    tp: int
    pp: int
    vpp: int
    # Set for an adapter checkpoint (LoRA): its model state holds only the adapters.
    lora: AdapterCheckpointInfo | None = None
    # Written by training (optimizer and scheduler state with the weights), not by a converter.
    has_optimizer: bool = False
    format: str = "legacy"  # or "torch_dist": then tp = pp = vpp = 1 (the global tensors)
    saved_layout: tuple[int, int, int] | None = None  # torch_dist: the (tp, pp, vpp) that wrote it
    args: argparse.Namespace | None = field(default=None, repr=False, compare=False)
    ep: int = 1  # expert-parallel size (MoE)
    expert_layout: str = "sequential"  # or "grouped" (see mtrain/models/experts.py)
    _reader: DistReader | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, ckpt_dir: str | Path, iteration: str | None = None) -> MegatronCheckpoint:
        ckpt_dir = Path(ckpt_dir)
        if iteration is None:
            it = read_tracker(ckpt_dir)
        else:
            it = parse_iteration(iteration, f"iteration={iteration} for {ckpt_dir}")
        iter_dir = ckpt_dir / iteration_dir_name(it)
        if not iter_dir.is_dir():
            raise CheckpointError(f"{iter_dir} not found (iteration {it} of {ckpt_dir})")
        if is_dist_checkpoint(iter_dir):
            return cls._open_dist(iter_dir)
        # mp_rank_00_000 is PP > 1 or EP > 1: the args of the first file found tell which
        names = ("mp_rank_00", "mp_rank_00_000", "mp_rank_00_000_000")
        found = [iter_dir / n / RANK_FILE for n in names if (iter_dir / n).is_dir()]
        first = found[0] if found else rank_file(iter_dir, 0, 0, 1)
        payload = load_rank_file(first)
        args = payload["args"]
        spec = spec_from_megatron_args(args, str(first))
        tp = int(args.tensor_model_parallel_size)
        pp = int(args.pipeline_model_parallel_size)
        vpp = int(getattr(args, "virtual_pipeline_model_parallel_size", None) or 1)
        ep = int(getattr(args, "expert_model_parallel_size", None) or 1)
        spec.check_parallel(tp, pp, vpp, source=f"{first} args")
        spec.check_experts(ep, tp, source=f"{first} args")
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                for ep_rank in range(ep):
                    path = rank_file(iter_dir, tp_rank, pp_rank, pp, ep_rank, ep)
                    if not path.is_file():
                        raise CheckpointError(
                            f"{path} not found: args say tp={tp} pp={pp} ep={ep}, so the "
                            "checkpoint is incomplete"
                        )
        lora = AdapterCheckpointInfo.from_args(args, str(first))
        return cls(
            iter_dir, spec, tp, pp, vpp, lora, has_optimizer="optimizer" in payload, args=args,
            ep=ep, expert_layout=expert_layout_of(args),
        )  # fmt: skip

    @classmethod
    def _open_dist(cls, iter_dir: Path) -> MegatronCheckpoint:
        common = iter_dir / COMMON
        args = load_rank_file(common, mmap=False)["args"]
        spec = spec_from_megatron_args(args, str(common))
        layout = (
            int(args.tensor_model_parallel_size),
            int(args.pipeline_model_parallel_size),
            int(getattr(args, "virtual_pipeline_model_parallel_size", None) or 1),
        )
        reader = DistReader(iter_dir)
        lora = AdapterCheckpointInfo.from_args(args, str(common))
        return cls(
            iter_dir, spec, 1, 1, 1, lora, reader.has_optimizer(), "torch_dist", layout, args,
            _reader=reader,
        )  # fmt: skip

    @property
    def head(self) -> str:
        """`score` for a reward model (its args say `model_head`), else `lm`."""
        return getattr(self.args, "model_head", None) or "lm"

    def rank_file(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> Path:
        """The file of one rank (torch_dist: the directory, which all ranks share)."""
        if self._reader is not None:
            return self.iter_dir
        return rank_file(self.iter_dir, tp_rank, pp_rank, self.pp, ep_rank, self.ep)

    def load_model_states(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> list[Any]:
        """The state dict of each virtual chunk of one rank (memory-mapped; torch_dist: read on
        access). Experts are presented under the sequential names whatever the layout."""
        if self._reader is not None:
            return [DistModelState(self._reader, self.spec)]
        path = self.rank_file(tp_rank, pp_rank, ep_rank)
        payload = load_rank_file(path)
        keys = ["model"] if self.vpp == 1 else [f"model{c}" for c in range(self.vpp)]
        missing = [k for k in keys if k not in payload]
        if missing:
            raise CheckpointError(f"{path} has no {missing[0]!r} entry; is vpp right in its args?")
        if self.expert_layout == "grouped":
            local = self.spec.num_experts // self.ep
            return [SequentialExperts(payload[k], local) for k in keys]
        return [payload[k] for k in keys]
