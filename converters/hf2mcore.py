"""HF safetensors -> Megatron legacy checkpoint, one rank file at a time.

    python -m converters.hf2mcore hf_dir=HF out_dir=CKPT tp=2 pp=2 [vpp=1] [dtype=bf16] [force=true]
        [iteration=release|N] [ep=2] [expert_layout=sequential|grouped]

Every rank file is built from slice reads of exactly the bytes it needs, so peak memory is about
one rank file whatever the model size. The result is a weights-only checkpoint that `load=`
starts a run from: named `release` (what Megatron-LM and mtrain write), or iteration N with
`iteration=N` (MindSpeed-LLM's convert_ckpt_v2 reads only a numbered tracker; its own hf2mg
writes iteration 1). MoE models: `ep=` splits the experts over that many EP rank files;
`expert_layout=grouped` stores them as GroupedMLP does (mtrain/models/experts.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from mtrain.checkpoint import (
    CHECKPOINT_VERSION,
    RELEASE,
    atomic_output_dir,
    check_output_dir,
    iteration_dir_name,
    megatron_args,
    parse_iteration,
    rank_file,
    save_rank_file,
    write_tracker,
)
from mtrain.checkpoint.args import EXPERT_LAYOUTS
from mtrain.checkpoint.hf_weights import check_hf_tensors, open_hf_reader
from mtrain.cli import hydra_command
from mtrain.dtypes import DTYPE_NAMES, parse_dtype
from mtrain.errors import ConfigError
from mtrain.models.experts import group_experts
from mtrain.models.sharding import Dims, shard
from mtrain.models.spec import load_hf_config
from mtrain.models.stages import stage_groups
from mtrain.plan import check_virtual_stages

log = logging.getLogger("converters.hf2mcore")


@dataclass
class HF2McoreConfig:
    hf_dir: str = MISSING  # HF model directory (config.json + safetensors, sharded or not)
    out_dir: str = MISSING  # where the Megatron checkpoint goes; must be empty unless force
    tp: int = 1  # tensor-parallel size of the output
    pp: int = 1  # pipeline-parallel size of the output
    vpp: int = 1  # virtual pipeline chunks per stage (interleaved schedule); 1 = off
    dtype: str | None = None  # bf16 | fp16 | fp32; default keeps each tensor's own dtype
    force: bool = False  # replace a non-empty out_dir (only once the new one is complete)
    iteration: str = "release"  # the checkpoint's name: release, or a number (1 for MindSpeed-LLM)
    ep: int = 1  # expert-parallel size of the output (MoE models): experts split over EP files
    expert_layout: str = "sequential"  # MoE experts: sequential (SequentialMLP) | grouped (GEMM)


def convert(cfg: HF2McoreConfig) -> Path:
    hf_dir, out_dir = Path(cfg.hf_dir), Path(cfg.out_dir)
    dtype = parse_dtype(cfg.dtype)
    check_output_dir(out_dir, cfg.force, [hf_dir])
    iteration = parse_iteration(cfg.iteration, f"iteration={cfg.iteration}")
    spec, _ = load_hf_config(hf_dir)
    check_virtual_stages(cfg.pp, cfg.vpp, prefix="")
    spec.check_parallel(cfg.tp, cfg.pp, cfg.vpp)
    spec.check_experts(cfg.ep, cfg.tp)
    if cfg.expert_layout not in EXPERT_LAYOUTS:
        raise ConfigError(f"expert_layout={cfg.expert_layout!r} must be one of {EXPERT_LAYOUTS}")
    reader = open_hf_reader(hf_dir, spec)
    dims = Dims.of(spec, cfg.tp)
    check_hf_tensors(reader, spec, dims)
    stored = reader.info(spec.family_table.embedding.hf[0]).dtype
    params_dtype = DTYPE_NAMES.get(dtype or stored, "bfloat16")
    args = megatron_args(spec, cfg.tp, cfg.pp, cfg.vpp, params_dtype, cfg.ep, cfg.expert_layout)
    grouped = spec.is_moe and cfg.expert_layout == "grouped"

    start = time.perf_counter()
    log.info(
        "hf2mcore: %s (%s, %d layers) -> %s at tp=%d pp=%d%s%s",
        hf_dir,
        spec.family,
        spec.num_layers,
        out_dir,
        cfg.tp,
        cfg.pp,
        f" vpp={cfg.vpp}" if cfg.vpp > 1 else "",
        f" ep={cfg.ep} ({cfg.expert_layout} experts)" if spec.is_moe else "",
    )
    with atomic_output_dir(out_dir, cfg.force, [hf_dir]) as temp:
        iter_dir = temp / iteration_dir_name(iteration)
        for pp_rank in range(cfg.pp):
            for tp_rank in range(cfg.tp):
                for ep_rank in range(cfg.ep):
                    chunks = []
                    with reader.session():  # handles closed after each rank file: bounded RSS
                        for chunk in range(cfg.vpp):
                            state = {}
                            groups = stage_groups(
                                spec, cfg.pp, cfg.vpp, pp_rank, chunk, cfg.ep, ep_rank
                            )
                            for group in groups:
                                for p in group:
                                    tensor = shard(p.entry, p.hf, reader, tp_rank, dims)
                                    state[p.mcore] = tensor if dtype is None else tensor.to(dtype)
                            if grouped:
                                state = group_experts(state, spec.num_experts // cfg.ep)
                            chunks.append(state)
                    payload = {
                        "args": args,
                        "checkpoint_version": CHECKPOINT_VERSION,
                        "iteration": 0 if iteration == RELEASE else iteration,
                    }
                    if cfg.vpp == 1:
                        payload["model"] = chunks[0]
                    else:
                        payload.update({f"model{c}": s for c, s in enumerate(chunks)})
                    path = rank_file(iter_dir, tp_rank, pp_rank, cfg.pp, ep_rank, cfg.ep)
                    save_rank_file(path, payload)
                    del chunks, payload
                    log.info("  wrote %s", path.relative_to(temp))
        write_tracker(temp, iteration)
    log.info("hf2mcore: done in %.1fs -> %s", time.perf_counter() - start, out_dir)
    return out_dir


@hydra_command("hf2mcore", HF2McoreConfig)
def main(cfg: HF2McoreConfig) -> None:
    convert(cfg)


if __name__ == "__main__":
    main()
