"""Conversion speed and memory on a synthetic Qwen3-shaped checkpoint of about 2.2 GB (bf16).

    python bench/convert.py [--work DIR] [--layers 16] [--tp 2] [--pp 2]
    python bench/convert.py --moe [--layers 40] [--ep 2]   # tp=1 pp=1 unless given

`--moe`: a Qwen3-MoE-shaped checkpoint instead (Qwen3-30B-A3B's 128 experts, top-8, narrowed to
hidden 1024 and expert width 64), about 2.8 GB at 40 layers, of which 15,360 expert tensors of
128 KiB: where per-tensor overheads dominate. Converted at `--ep` (default 2) and back.

Prints, side by side in one run: each direction's wall time divided by `cp -r` of the same
files on the same disk, and its peak RSS against the largest file it wrote (target: time ratio
<= 1.5, peak RSS <= largest output file + 1 GiB). Each conversion runs in its own process and
reports its own peak RSS (VmHWM, which starts afresh at exec, unlike ru_maxrss).

Timings on a VM can depend on whether the guest's memory pages were ever touched (first touch
traps to the hypervisor), so the benchmark touches `--prefault-gb` of memory once up front and
reports the best of `--repeat` runs of every timed step, conversions and copies alike.

The converters fsync what they write (an interrupted run must not leave a torn checkpoint), so
the copy is timed twice: `cp -r` alone, whose data may still be in the page cache when it
returns, and `cp -r` followed by `sync`, which is the same durability. Dirty pages left by
earlier steps are flushed before each timed step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtrain.config.model import load_preset  # noqa: E402
from mtrain.models.sharding import Dims  # noqa: E402
from mtrain.models.spec import hf_config_from_spec  # noqa: E402
from mtrain.models.stages import all_hf_tensors  # noqa: E402

GiB = 1024**3


def synthetic_spec(layers: int, moe: bool):
    """Qwen3-1.7B's shapes with `layers` layers, or (`moe`) the narrowed Qwen3-30B-A3B."""
    if not moe:
        return replace(load_preset("qwen3_1_7b").spec(), num_layers=layers)
    return replace(
        load_preset("qwen3_30b_a3b").spec(), num_layers=layers, hidden_size=1024,
        num_attention_heads=16, num_query_groups=4, kv_channels=64, moe_ffn_hidden_size=64,
    )  # fmt: skip


def write_synthetic_hf(
    out: str | Path, layers: int, shard_bytes: int = 1 << 30, moe: bool = False
) -> int:
    """Random bf16 weights of `synthetic_spec`, in ~1 GiB shards + index."""
    out = Path(out)
    spec = synthetic_spec(layers, moe)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(hf_config_from_spec(spec), indent=2))
    dims = Dims.of(spec, 1)
    generator = torch.Generator().manual_seed(0)
    weight_map, pending, size, total, files = {}, {}, 0, 0, 0

    def flush():
        nonlocal pending, size, files
        files += 1
        name = f"model-{files:05d}.safetensors"
        save_file(pending, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(pending, name))
        pending, size = {}, 0

    for name, (entry, pos) in all_hf_tensors(spec).items():
        shape = dims.hf_shapes(entry)[pos]
        tensor = torch.randn(shape, generator=generator, dtype=torch.float32).to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if pending and size + nbytes > shard_bytes:
            flush()
        pending[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def timed(*cmds: list[str], quiet: bool = False) -> float:
    subprocess.run(["sync"], check=True)  # start from a clean page cache state
    start = time.perf_counter()
    for cmd in cmds:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if quiet else None)
    return time.perf_counter() - start


def copy_times(src: Path, dst: Path, repeat: int) -> tuple[float, float]:
    """Best of `repeat` (cp -r, cp -r + sync) of `src`, each into a fresh `dst`."""
    plain, durable = [], []
    for _ in range(repeat):
        plain.append(timed(["cp", "-r", str(src), str(dst)]))
        shutil.rmtree(dst)
        durable.append(timed(["cp", "-r", str(src), str(dst)], ["sync"]))
        shutil.rmtree(dst)
    return min(plain), min(durable)


def prefault(gib: float) -> None:
    """Touch `gib` of memory in a child process, then free it (see the module docstring)."""
    code = f"import torch; torch.ones({int(gib * GiB)}, dtype=torch.uint8)"
    subprocess.run([sys.executable, "-c", code], check=True)


def best_of(repeat: int, direction: str, out: Path, **kwargs) -> dict:
    """Best wall time and highest peak RSS of `repeat` conversions into `out`."""
    runs = []
    for i in range(repeat):
        if i:
            shutil.rmtree(out)
        subprocess.run(["sync"], check=True)
        runs.append(convert_in_child(direction, out_dir=str(out), **kwargs))
    return {"wall": min(r["wall"] for r in runs), "rss": max(r["rss"] for r in runs)}


def convert_in_child(direction: str, **kwargs) -> dict:
    """Run one conversion in a fresh process; returns its wall time and its own peak RSS."""
    code = (
        "import json, resource, time, sys\n"
        "from omegaconf import OmegaConf\n"
        f"from converters.{direction} import convert, {'HF2McoreConfig' if direction == 'hf2mcore' else 'McoreToHFConfig'} as C\n"
        # Through OmegaConf, so nested groups (e.g. lora={'merge': False}) can be given as dicts.
        f"cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(C), {kwargs!r}))\n"
        "t = time.perf_counter()\n"
        "convert(cfg)\n"
        "wall = time.perf_counter() - t\n"
        "rss = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024\n"
        "print(json.dumps({'wall': wall, 'rss': rss}))\n"
    )
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_wall"] = time.perf_counter() - start
    return result


def baseline_rss() -> int:
    """Peak RSS of a process that only imports what a converter imports."""
    code = (
        "import converters.hf2mcore, converters.mcore2hf\n"
        "print(int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))"
        ".split()[1]) * 1024)"
    )
    return int(
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
        )
        .stdout.strip()
        .splitlines()[-1]
    )


def largest_file(root: Path) -> int:
    return max(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench_out" / "convert")
    parser.add_argument("--moe", action="store_true", help="a Qwen3-MoE-shaped checkpoint")
    parser.add_argument("--layers", type=int, default=None, help="16 (dense), 40 (--moe)")
    parser.add_argument("--tp", type=int, default=None, help="2 (dense), 1 (--moe)")
    parser.add_argument("--pp", type=int, default=None, help="2 (dense), 1 (--moe)")
    parser.add_argument("--ep", type=int, default=2, help="expert parallelism (--moe)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for every timing")
    parser.add_argument("--prefault-gb", type=float, default=8.0)
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = parser.parse_args()
    dense = not args.moe
    args.layers = args.layers or (16 if dense else 40)
    args.tp = args.tp or (2 if dense else 1)
    args.pp = args.pp or (2 if dense else 1)
    ep = {} if dense else {"ep": args.ep}

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    hf, ckpt, back = work / "hf", work / "mcore", work / "hf_back"
    # Generated in a child process, so that this one stays small.
    code = (
        "from bench.convert import write_synthetic_hf as w; "
        f"print(w({str(hf)!r}, {args.layers}, moe={args.moe}))"
    )
    total = int(
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    shape = "Qwen3-1.7B" if dense else "Qwen3-MoE (128 experts, hidden 1024, expert width 64)"
    tensors = sum(len(json.loads((f).read_text())["weight_map"]) for f in hf.glob("*.index.json"))
    print(
        f"synthetic {shape}-shaped checkpoint, {args.layers} layers: {total / 1e9:.2f} GB "
        f"bf16, {tensors} tensors in {len(list(hf.glob('*.safetensors')))} shards"
    )

    prefault(args.prefault_gb)
    timed(["cat", *map(str, hf.glob("*"))], ["true"], quiet=True)  # warm the page cache
    copy_hf = copy_times(hf, work / "hf_copy", args.repeat)
    to_mcore = best_of(args.repeat, "hf2mcore", ckpt, hf_dir=str(hf), tp=args.tp, pp=args.pp, **ep)
    copy_mcore = copy_times(ckpt, work / "mcore_copy", args.repeat)
    to_hf = best_of(args.repeat, "mcore2hf", back, ckpt_dir=str(ckpt))
    base = baseline_rss()

    rows = [
        ("hf2mcore", to_mcore, copy_hf, largest_file(ckpt)),
        ("mcore2hf", to_hf, copy_mcore, largest_file(back)),
    ]
    print(
        f"\nlayout tp={args.tp} pp={args.pp}"
        + ("" if dense else f" ep={args.ep}")
        + f", best of {args.repeat}; RSS of a process that only imports the converters: "
        f"{base / GiB:.2f} GiB"
    )
    print(
        f"{'direction':<9} {'time s':>7} {'cp s':>6} {'cp+sync s':>9} {'/cp':>6} "
        f"{'/cp+sync':>8} {'peak RSS GiB':>12} {'largest out GiB':>15} {'RSS-out GiB':>11}"
    )
    ok = True
    for name, res, (plain, durable), largest in rows:
        over = (res["rss"] - largest) / GiB
        ok &= res["wall"] / durable <= 1.5 and over <= 1.0
        print(
            f"{name:<9} {res['wall']:>7.2f} {plain:>6.2f} {durable:>9.2f} "
            f"{res['wall'] / plain:>6.2f} {res['wall'] / durable:>8.2f} "
            f"{res['rss'] / GiB:>12.2f} {largest / GiB:>15.2f} {over:>11.2f}"
        )
    print(
        f"\ntargets (time <= 1.5 x durable copy, peak RSS <= largest output + 1 GiB): "
        f"{'met' if ok else 'NOT met'}"
    )
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
