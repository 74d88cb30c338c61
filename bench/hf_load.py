"""Starting a run from HF weights directly (`load=HF_DIR`) vs from the converted checkpoint.

    python bench/hf_load.py [--work DIR] [--layers 28] [--repeat 2]

On the synthetic Qwen3-1.7B-shaped bf16 model of bench/convert.py (28 layers: about 4 GB), at
TP2 x PP2 on 4 CPU processes: each rank builds its model chunks without initialisation (as a run
that loads weights does), then fills them from the HF safetensors (its own slices only) or from
its rank file of the converted checkpoint. Prints, side by side in one run, the load time of each
(the slowest rank, best of `--repeat`; it includes the first touch of the parameters' memory,
which the build leaves untouched) and their ratio (target <= 1.2), the build time, and each
rank's peak RSS against its own shard (target: peak RSS <= its shard + 1 GiB; the peak includes
torch and megatron-core themselves).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GiB = 1024**3


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(mode: str, source: str, result: str) -> None:
    """One rank: build this rank's chunks, time filling them, report time, RSS and shard size."""
    import torch

    from mtrain import accel, parallel
    from mtrain.checkpoint import load_hf_weights, load_model_weights
    from mtrain.models.provider import BuildOptions, build_model_chunks
    from mtrain.models.spec import load_hf_config

    hf_dir = source if mode == "hf" else os.environ["BENCH_HF_DIR"]
    spec, _ = load_hf_config(hf_dir)
    accel.activate("cpu")
    parallel.init(2, 2)
    torch.distributed.barrier()
    start = time.perf_counter()
    opts = BuildOptions(tp=2, pp=2, precision="bf16", initialize=False)  # as a run that loads
    chunks = build_model_chunks(spec, opts)
    build = time.perf_counter() - start
    shard = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    torch.distributed.barrier()
    start = time.perf_counter()
    if mode == "hf":
        load_hf_weights(chunks, source, spec, 2, 2, 1)
    else:
        load_model_weights(chunks, source, spec, 2, 2, 1)
    seconds = time.perf_counter() - start
    rank = torch.distributed.get_rank()
    row = {"rank": rank, "s": seconds, "build": build, "rss": peak_rss(), "shard": shard}
    rows = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rows, row)
    if torch.distributed.get_rank() == 0:
        Path(result).write_text(json.dumps(rows))
    parallel.shutdown()


def run(mode: str, source: Path, hf_dir: Path, work: Path) -> list[dict]:
    result = work / f"{mode}.json"
    subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4",
            "--master_addr=127.0.0.1", "--master_port=29611", __file__,
            "--worker", mode, str(source), str(result),
        ],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "BENCH_HF_DIR": str(hf_dir),
             "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from bench.convert import write_synthetic_hf
    from converters import hf2mcore
    from converters.hf2mcore import HF2McoreConfig

    work = Path(args.work or tempfile.mkdtemp(prefix="mtrain-hf-load-"))
    hf, ckpt = work / "hf", work / "ckpt"
    if not hf.exists():
        size = write_synthetic_hf(hf, args.layers)
        print(f"synthetic HF model: {size / GiB:.2f} GiB in {hf}")
    if not ckpt.exists():
        hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(ckpt), tp=2, pp=2))
    best = {}
    for mode, source in (("converted", ckpt), ("hf", hf)) * args.repeat:
        rows = run(mode, source, hf, work)
        slowest = max(r["s"] for r in rows)
        if mode not in best or slowest < best[mode][0]:
            best[mode] = (slowest, rows)
    for mode, (seconds, rows) in best.items():
        worst = max(rows, key=lambda r: r["rss"] - r["shard"])
        build = max(r["build"] for r in rows)
        print(
            f"{mode:9s} load {seconds:6.2f} s (slowest rank; build {build:.2f} s before it); "
            f"peak RSS {worst['rss'] / GiB:.2f} "
            f"GiB on rank {worst['rank']} = its shard {worst['shard'] / GiB:.2f} GiB + "
            f"{(worst['rss'] - worst['shard']) / GiB:.2f} GiB"
        )
    ratio = best["hf"][0] / best["converted"][0]
    over = max(r["rss"] - r["shard"] for r in best["hf"][1]) / GiB
    print(f"HF-direct / converted load time: {ratio:.2f} (target <= 1.2)")
    print(f"HF-direct peak RSS over the shard: {over:.2f} GiB (target <= 1.0)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
    else:
        main()
