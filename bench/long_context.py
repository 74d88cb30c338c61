"""Context parallelism on CPU: peak memory per rank against sequence length at CP 1 / 2 / 4, and
the step time of CP2 against CP1 on the same tokens.

    python bench/long_context.py [--seqs 2048 4096 8192] [--cps 1 2 4] [--kernels sdpa]

One torchrun launch per CP size (CP processes, TP = PP = DP = 1) builds a random Qwen3-shaped
model (hidden 256, 4 layers, 8 query / 4 kv heads, head dim 64, fp32) and, for each sequence
length, runs one forward-backward of a single sequence: a warm-up, one measured for memory and
one timed. Memory is the growth of the process's resident set over the step (VmHWM after the
step minus VmRSS before it, with the peak counter reset through /proc/self/clear_refs and glibc
told to return every large block at once, MALLOC_MMAP_THRESHOLD_), so it counts what the step
allocates: activations, their gradients, the Ulysses exchange buffers and the parameter
gradients (a few MB here). With a flash attention (sdpa) activations grow linearly in the
sequence and should fall close to 1/cp; kernels=local adds the s x s attention scores of its
1/cp heads.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 1024**2


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024


def reset_peak() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def worker(seqs: list[int], kernels: str) -> None:
    import torch

    from mtrain import accel, parallel
    from mtrain.context_parallel import shard_batch
    from mtrain.models.provider import BuildOptions, build_model_chunks
    from mtrain.models.spec import ModelSpec

    accel.activate("cpu")
    cp = int(os.environ["WORLD_SIZE"])
    parallel.init(1, 1, cp=cp)
    spec = ModelSpec(
        family="qwen3", num_layers=4, hidden_size=256, ffn_hidden_size=768,
        num_attention_heads=8, num_query_groups=4, kv_channels=64, vocab_size=512,
        max_position_embeddings=max(seqs), rope_theta=1e6, norm_epsilon=1e-6,
        tie_word_embeddings=True,
    )  # fmt: skip
    (model,) = build_model_chunks(spec, BuildOptions(cp=cp, kernels=kernels))
    rows = []
    for seq in seqs:
        g = torch.Generator().manual_seed(seq)
        batch = {
            "tokens": torch.randint(0, 512, (1, seq), generator=g),
            "labels": torch.randint(0, 512, (1, seq), generator=g),
            "position_ids": torch.arange(seq)[None],
        }
        mine = shard_batch(batch, cp, parallel.cp_rank())

        def step(mine=mine):
            model.zero_grad(set_to_none=True)
            out = model(mine["tokens"], mine["position_ids"], None, labels=mine["labels"])
            out.sum().backward()

        step()  # warm-up
        model.zero_grad(set_to_none=True)
        reset_peak()
        before = status("VmRSS")
        step()
        peak = status("VmHWM") - before
        torch.distributed.barrier()
        start = time.perf_counter()
        step()
        torch.distributed.barrier()
        seconds = time.perf_counter() - start
        peaks = [None] * cp
        torch.distributed.all_gather_object(peaks, peak)
        rows.append({"seq": seq, "cp": cp, "peak_mib": [p / MiB for p in peaks], "step_s": seconds})
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(rows))
    parallel.shutdown()


def launch(cp: int, seqs: list[int], kernels: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cp}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, "--worker",
           "--kernels", kernels, "--seqs", *map(str, seqs)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONWARNINGS": "ignore"}  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"cp={cp} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--kernels", default="sdpa", choices=["sdpa", "local"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.seqs, args.kernels)
    results = {cp: {r["seq"]: r for r in launch(cp, args.seqs, args.kernels)} for cp in args.cps}
    print(f"kernels={args.kernels}; peak step memory per rank (max over ranks), MiB; vs CP1")
    print("seq      " + "".join(f"{f'cp={cp}':>20}" for cp in args.cps))
    for seq in args.seqs:
        base = max(results[args.cps[0]][seq]["peak_mib"])
        cells = []
        for cp in args.cps:
            peak = max(results[cp][seq]["peak_mib"])
            cells.append(f"{peak:10.1f} ({peak / base:5.2f})")
        print(f"{seq:<9}" + "".join(f"{c:>20}" for c in cells))
    if 1 in results and 2 in results:
        print("step time, same tokens: cp=1 (1 process) vs cp=2 (2 processes)")
        for seq in args.seqs:
            one, two = results[1][seq]["step_s"], results[2][seq]["step_s"]
            print(f"{seq:<9}cp=1 {one:7.3f} s   cp=2 {two:7.3f} s   ratio {two / one:5.2f}")


if __name__ == "__main__":
    main()
