"""LoRA merge-and-export against plain export of the same base, in time and peak memory.

    python bench/lora_merge.py [--work DIR] [--layers 16] [--rank 16] [--repeat 3]

Builds the synthetic Qwen3-shaped model of bench/convert.py (about 2.2 GB bf16 at 16 layers),
converts it to a TP2 PP2 Megatron checkpoint, and writes random adapters (r = `--rank`, B non-zero
so that the merge really computes) on all four targets as an adapter checkpoint of that base.
Then, after the prefault and page-cache warming of bench/convert.py, best of `--repeat`, each in
its own process reporting its own peak RSS (VmHWM):

    plain   mcore2hf of the base checkpoint
    merged  mcore2hf of the adapters, lora.merge=true (the base with W + s B A written out)
    peft    mcore2hf of the adapters, lora.merge=false (a PEFT adapter; for information)

and prints merged / plain for the best time and the peak RSS (target: time <= 1.3, RSS <= 1.2).
The three exports run interleaved, round after round, and the median time is shown beside the
best: on a small VM one export's time can vary by a third from run to run. Once, it checks
the merged export against an independent reference: for q_proj, gate_proj and down_proj of one
layer, merged == bf16(fp32(W) + s fp32(B) @ fp32(A)) to within 1 bf16 ulp, with W from the plain
export and A, B from the PEFT export (the converter sums in another order, so the last bit of a
rounding may differ).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.convert import GiB, baseline_rss, best_of, convert_in_child, prefault, timed  # noqa: E402
from mtrain.checkpoint import (  # noqa: E402
    CHECKPOINT_VERSION,
    AdapterCheckpointInfo,
    MegatronCheckpoint,
    iteration_dir_name,
    load_rank_file,
    rank_file,
    save_rank_file,
    write_tracker,
)
from mtrain.checkpoint.peft import PEFT_WEIGHTS, adapter_names, peft_names  # noqa: E402
from mtrain.config.lora import TARGETS, LoraConfig  # noqa: E402
from mtrain.models.families.base import HF_LAYER_PREFIX, MCORE_LAYER_PREFIX, Kind  # noqa: E402
from mtrain.models.sharding import Dims, shard_shape  # noqa: E402
from mtrain.models.stages import piece_layers  # noqa: E402

ITERATION = 1
TIME_TARGET, RSS_TARGET = 1.3, 1.2
CHECKED = ("self_attn.q_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight")


def write_synthetic_adapters(base_ckpt_dir: Path, out_dir: Path, r: int) -> LoraConfig:
    """An adapter checkpoint of `base_ckpt_dir` (vpp 1) with random bf16 A and B on every target.

    Each adapter is drawn whole from a generator seeded by (layer, target) and then split like
    training splits it, so the matrices that are replicated across TP ranks are equal there.
    """
    base = MegatronCheckpoint.open(base_ckpt_dir)
    spec, tp, pp = base.spec, base.tp, base.pp
    cfg = LoraConfig(r=r, alpha=2.0 * r).validate()
    info = AdapterCheckpointInfo(cfg, str(base_ckpt_dir.resolve()), base_iteration="release")
    entries, dims = spec.family_table.lora_targets, Dims.of(spec, tp)
    iter_dir = out_dir / iteration_dir_name(ITERATION)
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            args = argparse.Namespace(
                **vars(load_rank_file(base.rank_file(tp_rank, pp_rank))["args"])
            )
            vars(args).update(info.to_args())
            model = {}
            for local, layer in enumerate(piece_layers(spec, pp, 1, pp_rank, 0)):
                for target in TARGETS:
                    entry = entries[target]
                    rows, cols = shard_shape(entry, dims)
                    row = entry.kind is Kind.ROW
                    gen = torch.Generator().manual_seed(
                        layer * len(TARGETS) + TARGETS.index(target)
                    )
                    a = torch.randn(r, cols * tp if row else cols, generator=gen) * 0.1
                    b = torch.randn(rows if row else rows * tp, r, generator=gen) * 0.1
                    if row:
                        a = a[:, tp_rank * cols : (tp_rank + 1) * cols]
                    else:
                        b = b[tp_rank * rows : (tp_rank + 1) * rows]
                    a_name, b_name = adapter_names(MCORE_LAYER_PREFIX.format(i=local) + entry.mcore)
                    model[a_name] = a.to(torch.bfloat16).contiguous()
                    model[b_name] = b.to(torch.bfloat16).contiguous()
            payload = {
                "args": args,
                "checkpoint_version": CHECKPOINT_VERSION,
                "iteration": ITERATION,
                "model": model,
            }
            save_rank_file(rank_file(iter_dir, tp_rank, pp_rank, pp), payload)
    write_tracker(out_dir, ITERATION)
    return cfg


def hf_tensor(hf_dir: Path, name: str) -> torch.Tensor:
    """One tensor of an HF model, sharded (with an index) or a single model.safetensors."""
    index = hf_dir / "model.safetensors.index.json"
    file = (
        json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    )
    with safe_open(str(hf_dir / file), "pt") as f:
        return f.get_tensor(name)


def check_merge(plain: Path, merged: Path, peft: Path, layer: int, scaling: float) -> float:
    """Largest distance, in bf16 ulps, of a merged tensor from the reference (module docstring)."""
    worst = 0.0
    with safe_open(str(peft / PEFT_WEIGHTS), "pt") as adapters:
        for name in CHECKED:
            hf = HF_LAYER_PREFIX.format(i=layer) + name
            a_name, b_name = peft_names(hf)
            a, b = adapters.get_tensor(a_name).float(), adapters.get_tensor(b_name).float()
            exact = hf_tensor(plain, hf).float() + scaling * (b @ a)
            got = hf_tensor(merged, hf).float()
            # bf16 keeps 8 significant bits: one ulp of x = m 2^e (0.5 <= |m| < 1) is 2^(e - 8).
            ulp = torch.ldexp(
                torch.ones_like(got), torch.frexp(got.abs().maximum(exact.abs()))[1] - 8
            )
            ulps = ((got - exact.bfloat16().float()).abs() / ulp).max().item()
            changed = (got != hf_tensor(plain, hf).float()).float().mean().item()
            print(f"  {hf}: max {ulps:.0f} ulp from the reference, {changed:.0%} of values changed")
            worst = max(worst, ulps)
    return worst


def run(args: argparse.Namespace, work: Path) -> None:
    hf, ckpt, lora = work / "hf", work / "mcore", work / "lora"
    # Generated in a child process, so that this one stays small.
    code = (
        f"from bench.convert import write_synthetic_hf as w; print(w({str(hf)!r}, {args.layers}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
    )
    total = int(out.stdout.strip().splitlines()[-1])
    convert_in_child("hf2mcore", hf_dir=str(hf), out_dir=str(ckpt), tp=2, pp=2)
    cfg = write_synthetic_adapters(ckpt, lora, args.rank)
    lora_bytes = sum(p.stat().st_size for p in lora.rglob("*.pt"))
    print(
        f"synthetic Qwen3-1.7B-shaped checkpoint, {args.layers} layers: {total / 1e9:.2f} GB bf16, "
        f"tp=2 pp=2; adapters r={cfg.r} alpha={cfg.alpha:g} on {', '.join(TARGETS)}: "
        f"{lora_bytes / 1e6:.1f} MB"
    )

    prefault(args.prefault_gb)
    timed(["cat", *map(str, ckpt.rglob("*.pt")), *map(str, lora.rglob("*.pt"))], quiet=True)
    exports = {  # output directory -> mcore2hf arguments
        "plain": {"ckpt_dir": str(ckpt)},
        "merged": {"ckpt_dir": str(lora)},
        "peft": {"ckpt_dir": str(lora), "lora": {"merge": False}},
    }
    # Rounds interleave the exports, so that a slow spell of the VM does not hit only one of them.
    runs = {name: [] for name in exports}
    for _ in range(args.repeat):
        for name, kwargs in exports.items():
            shutil.rmtree(work / name, ignore_errors=True)
            runs[name].append(best_of(1, "mcore2hf", work / name, **kwargs))
    res = {
        name: {
            "wall": min(r["wall"] for r in rs),
            "median": statistics.median(r["wall"] for r in rs),
            "rss": max(r["rss"] for r in rs),
        }
        for name, rs in runs.items()
    }
    plain, merged = res["plain"], res["merged"]
    base = baseline_rss()

    layer = args.layers - 1  # on the last pipeline stage
    print(f"\nmerged vs bf16(W + s B A) from the plain and PEFT exports, layer {layer}:")
    worst = check_merge(work / "plain", work / "merged", work / "peft", layer, cfg.scaling)

    print(
        f"\nbest of {args.repeat}; RSS of a process that only imports the converters: "
        f"{base / GiB:.2f} GiB"
    )
    print(
        f"{'export':<7} {'best s':>7} {'median s':>8} {'peak RSS GiB':>12} {'best /plain':>11} "
        f"{'RSS /plain':>10}"
    )
    for name, r in res.items():
        print(
            f"{name:<7} {r['wall']:>7.2f} {r['median']:>8.2f} {r['rss'] / GiB:>12.2f} "
            f"{r['wall'] / plain['wall']:>11.2f} {r['rss'] / plain['rss']:>10.2f}"
        )
    time_ratio, rss_ratio = merged["wall"] / plain["wall"], merged["rss"] / plain["rss"]
    ok = time_ratio <= TIME_TARGET and rss_ratio <= RSS_TARGET
    print(
        f"\nmerged/plain: time {time_ratio:.2f} (target <= {TIME_TARGET}), peak RSS "
        f"{rss_ratio:.2f} (target <= {RSS_TARGET}): {'met' if ok else 'NOT met'}; merge within "
        f"1 bf16 ulp of the reference: {'yes' if worst <= 1 else f'NO ({worst:.0f} ulp)'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16, help="LoRA r")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for every timing")
    parser.add_argument("--prefault-gb", type=float, default=8.0)
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="lora_merge_"))
    shutil.rmtree(work, ignore_errors=True)
    try:
        run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
