"""DPO's reference log-probs, from forward-only passes through megatron's pipeline schedule.

- `precompute`: one pass over the training pairs with the starting weights, before the first
  step; the log-probs go to a cache file keyed by the data and the starting checkpoint, so a
  resumed or repeated run reads them back and training holds one model.
- `model`: a frozen copy of the starting model at the same layout, run on every step's
  micro-batches before the step (classic DPO, twice the weights in memory).
- LoRA: the policy itself with its adapters off, per step, at no extra memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from mtrain import accel, parallel
from mtrain.checkpoint import MegatronCheckpoint, atomic_paths, is_hf_dir, load_start_weights
from mtrain.errors import ConfigError
from mtrain.lora import adapters_disabled
from mtrain.losses import pair_forward, sequence_logps
from mtrain.schedule import run_schedule

log = logging.getLogger("mtrain.dpo")

Batch = dict[str, torch.Tensor]


def pass_logps(chunks: list, batches: list[Batch], tr) -> list[torch.Tensor]:
    """Log-probs [m, 2] of each micro-batch's pairs, in order, on the last pipeline stage (an
    empty list elsewhere). Collective over the model-parallel group."""
    captured: list[torch.Tensor] = []

    def capture(batch: Batch, token_losses: torch.Tensor):
        logps, _ = sequence_logps(batch, token_losses)
        captured.append(logps.detach())
        return token_losses.sum() * 0.0, torch.ones((), dtype=torch.int), {}

    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    with torch.no_grad():
        run_schedule(
            chunks,
            [iter(batches) for _ in chunks],
            pair_forward,
            capture,
            len(batches),
            tr.seq_length,
            tr.micro_batch_size * 2,
            forward_only=True,
        )
    for c, mode in zip(chunks, modes):
        c.train(mode)
    return captured if parallel.is_last_stage() else []


def _attach(batches: list[Batch], logps: list[torch.Tensor]) -> None:
    for batch, values in zip(batches, logps):
        batch["ref_logps"] = values


def frozen_copy(run) -> list:
    """The starting model again, frozen and in eval mode, at the run's layout."""
    from mtrain.models.provider import build_model_chunks

    spec, plan = run.spec, run.plan
    options = dataclasses.replace(run.options, initialize=False)  # the load fills every weight
    chunks = [c.to(accel.device()) for c in build_model_chunks(spec, options)]
    load_start_weights(chunks, run.cfg.load, spec, plan)
    for c in chunks:
        c.requires_grad_(False)
        c.eval()
    return chunks


class ModelReference:
    """The `model` reference: a frozen copy of the starting model, built on first use (or, with
    LoRA, the policy itself with its adapters off). `before_step` attaches its log-probs to a
    step's micro-batches; `chunks` lends it for other passes (the validation pairs')."""

    def __init__(self):
        self.copy: list = []

    @contextlib.contextmanager
    def chunks(self, run):
        if run.cfg.finetuning_type == "lora":
            with adapters_disabled(run.model):
                yield run.model
            return
        if not self.copy:
            self.copy.extend(frozen_copy(run))
            log.info("reference: a frozen copy of %s at the same layout", run.cfg.load)
        yield self.copy

    def before_step(self, run, batches: list[Batch]) -> None:
        with self.chunks(run) as chunks:
            _attach(batches, pass_logps(chunks, batches, run.cfg.train))


def cache_key(fingerprint: dict, load: str) -> str:
    """The starting checkpoint's identity (path, iteration, rank files' sizes and times) and the
    data's, as one hash: a changed model or data set never reads stale log-probs."""
    ckpt = None if is_hf_dir(load) else MegatronCheckpoint.open(load)
    root = Path(load) if ckpt is None else ckpt.iter_dir
    files = sorted(p for p in root.rglob("*") if p.is_file())
    stamps = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    if ckpt is not None and ckpt.lora is not None:
        stamps.append(("base", ckpt.lora.base_dir, ckpt.lora.base_iteration))
    blob = json.dumps({"data": fingerprint, "model": stamps}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def precompute(run, dataset, path: Path, chunks: list | None = None) -> np.ndarray:
    """Reference log-probs [pairs, 2] of `dataset` (items carry `pair`), from `chunks` (by
    default the run's model as it is now: the starting weights), written to `path` once; every
    rank returns the array."""
    from mtrain.data.sampler import collate

    if path.is_file():
        log.info("reference log-probs: reusing %s", path)
        return np.load(path)
    if chunks is None and run.state.iteration > 0:
        raise ConfigError(
            f"the reference log-prob cache {path} is gone and the run resumes at iteration "
            f"{run.state.iteration}: they must come from the starting weights; restore the "
            "cache, start the run afresh, or use dpo.reference=model"
        )
    start = time.perf_counter()
    tr, plan = run.cfg.train, run.plan
    mbs, dp, dp_rank = tr.micro_batch_size, plan.dp, parallel.dp_rank()
    n = len(dataset)
    # Every DP rank runs the same number of micro-batches (the metric reduction is collective
    # over DP); the last ones wrap around and are computed twice.
    per_rank = -(-n // (mbs * dp))
    per_call = plan.micro_batches
    calls = -(-per_rank // per_call)
    found: dict[int, list[float]] = {}
    for call in range(calls):
        batches, pair_ids = [], []
        for k in range(call * per_call, (call + 1) * per_call):
            first = (k * dp + dp_rank) * mbs
            items = [dataset[(first + j) % n] for j in range(mbs)]
            pair_ids += [int(item["pair"]) for item in items]
            batches.append(collate(items))
        logps = pass_logps(run.model if chunks is None else chunks, batches, tr)
        if logps:
            for pid, values in zip(pair_ids, torch.cat(logps).tolist()):
                found[pid] = values
        if call == 0 or (call + 1) % 10 == 0 or call + 1 == calls:
            log.info("reference log-probs: %d/%d passes", call + 1, calls)
    last_stage = parallel.is_last_stage()
    if last_stage:
        parts = [None] * dp
        torch.distributed.all_gather_object(parts, found, group=parallel.dp_group())
        if parallel.tp_rank() == 0 and dp_rank == 0 and parallel.cp_rank() == 0:
            table = np.zeros((n, 2), dtype=np.float64)
            for part in parts:
                for pid, values in part.items():
                    table[pid] = values
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_paths(path) as (tmp,), open(tmp, "wb") as f:
                np.save(f, table)
            log.info(
                "reference log-probs of %d pairs in %.1f s -> %s",
                n,
                time.perf_counter() - start,
                path,
            )
    torch.distributed.barrier()
    return np.load(path)


class WithReference(torch.utils.data.Dataset):
    """A pair dataset whose items also carry their precomputed reference log-probs."""

    def __init__(self, dataset, table: np.ndarray):
        self.dataset, self.table = dataset, torch.from_numpy(table)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Batch:
        item = dict(self.dataset[i])
        item["ref_logps"] = self.table[int(item["pair"])]
        return item
