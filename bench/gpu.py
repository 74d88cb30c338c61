"""Training-step speed on one accelerator, mtrain beside plain HF transformers, in minutes.

    python bench/gpu.py --device cuda --out results.jsonl      (bench/README.md: the device run)
    python bench/gpu.py --tiny                                 (every path on CPU, in seconds)

On one device, bf16, random weights, Qwen3-8B- and Qwen3-1.7B-shaped models (conf/model presets,
`--layers` fewer of them where memory says so) at seq 4096, one optimizer step over
`--micro-batches` micro-batches of `--micro-batch-size` rows:
- mtrain's training step with each `kernels=` choice this machine runs (local, sdpa, te; a
  choice it cannot run gets a line saying why);
- the same model, batch and optimizer settings trained with plain HF transformers + torch AdamW
  (bench/gpu_steps.py says exactly what each side runs), and mtrain / HF in tokens/s;
- a packed-SFT step (`--segments` samples a row, block-causal attention, what mtrain's packed SFT
  runs) against the unpacked one, and LoRA against full, with the best kernels (te, else sdpa).

Each measurement builds its model, runs `--warmup` steps, then times `--steps` steps, waiting for
the device before and after each; reported: the median step, tokens/s, model TFLOP/s, MFU against
the device's peak (mtrain/accel/peak.py; null with the reason when unknown) and the device's peak
memory over build and steps. Model FLOPs are mtrain.progress.flops_per_token for both sides:
6 * (matmul parameters: every linear and the output layer, not the embedding lookup) per token
+ 12 * layers * seq * heads * head_dim per token for attention, over the full square (no causal
halving; `attention_share` in each line says how much of the count that term is). LoRA and
packed lines count the same FLOPs as full: their MFU is a throughput index on a common scale.

One JSON line per measurement on stdout and in `--out` (written as it goes, so a run cut short
keeps what it measured), a table at the end. Running out of device memory is recorded and the run
goes on; any other failure is recorded too and makes the exit status 1. `--budget-s` stops
starting measurements once that much time has passed (they are recorded as skipped).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

START = time.perf_counter()  # elapsed times count torch's and megatron's imports too

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_steps import Batches, Step, hf_step, mtrain_step  # noqa: E402
from bench.kernels import memory_module, synchronize  # noqa: E402
from mtrain import accel, parallel  # noqa: E402
from mtrain.accel.peak import lookup  # noqa: E402
from mtrain.config.model import load_preset  # noqa: E402
from mtrain.errors import ConfigError  # noqa: E402
from mtrain.kernels import resolve_kernels  # noqa: E402
from mtrain.models.spec import ModelSpec  # noqa: E402
from mtrain.progress import flops_per_token  # noqa: E402

GiB = 2**30
PRESETS = {"8b": "qwen3_8b", "1.7b": "qwen3_1_7b"}
# 8B at seq 4096 on one 141 GB H200: all 36 layers need ~147 GB for mtrain's fp32 master
# weights, gradients and Adam moments alone; 12 leave room for local attention's s x s scores.
LAYERS = {"8b": 12, "1.7b": 28}
TINY = ModelSpec(
    family="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
    num_query_groups=2, kv_channels=16, vocab_size=256, max_position_embeddings=64,
    rope_theta=1e6, norm_epsilon=1e-6, tie_word_embeddings=False,
)  # fmt: skip
# Per-run defaults: (accelerator, --tiny); sized so that both shapes, every measurement and the
# model builds take about 4-5 minutes on one H200.
DEFAULTS = {
    "seq": (4096, 64),
    "micro_batch_size": (1, 1),
    "micro_batches": (4, 2),
    "segments": (8, 4),
    "warmup": (3, 1),
    "steps": (8, 2),
}
KERNELS = ("te", "sdpa", "local")  # measured in this order: the likely fastest first


# --- what runs ---------------------------------------------------------------------------------


def shapes(a: argparse.Namespace) -> dict[str, ModelSpec]:
    if a.tiny:
        return {"tiny": replace(TINY, max_position_embeddings=a.seq)}
    layers = dict(LAYERS)
    for item in filter(None, (a.layers or "").split(",")):
        name, _, n = item.partition("=")
        if name not in PRESETS or not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--layers {item!r}: give SHAPE=N with SHAPE in {', '.join(PRESETS)}")
        layers[name] = int(n)
    out = {}
    for name in filter(None, a.shapes.split(",")):
        if name not in PRESETS:
            raise ConfigError(f"--shapes: {name!r} is not one of {', '.join(PRESETS)}")
        spec = load_preset(PRESETS[name]).spec()
        out[name] = replace(spec, num_layers=layers[name], max_position_embeddings=a.seq)
    return out


def kernel_choices(device_name: str) -> tuple[list[str], dict[str, str]]:
    """(the kernels this machine runs, {kernels it does not: why}), for mtrain's full step."""
    runs, skipped = [], {}
    for k in KERNELS:
        try:
            resolve_kernels(k, device_name)
            if k == "te":  # installed is not enough: a broken build fails only on import
                importlib.import_module("transformer_engine.pytorch")
            runs.append(k)
        except (ConfigError, ImportError, OSError) as err:
            reason = str(err) or type(err).__name__
            skipped[k] = f"transformer_engine is not importable: {reason}" if k == "te" else reason
    return runs, skipped


# --- measuring ---------------------------------------------------------------------------------


class Bench:
    """Runs measurements one by one, writing a JSON line for each."""

    def __init__(self, a: argparse.Namespace, peak, out):
        self.a, self.peak, self.out = a, peak, out
        self.t0 = START
        self.records: list[dict] = []
        self.failed = 0

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.t0, 1)

    def emit(self, record: dict) -> dict:
        record["elapsed_s"] = self.elapsed()
        line = json.dumps(record)
        print(line, flush=True)
        if self.out is not None:
            self.out.write(line + "\n")
            self.out.flush()
        self.records.append(record)
        return record

    def skip(self, base: dict, reason: str) -> dict:
        return self.emit({**base, "skipped": reason})

    def measure(self, base: dict, spec: ModelSpec, shape: Batches, build) -> dict:
        """Build a step, warm it up, time it; one record (an error one if it fails)."""
        a = self.a
        if a.budget_s is not None and self.elapsed() > a.budget_s:
            return self.skip(base, f"time budget: {a.budget_s} s spent before it started")
        mem = memory_module()
        _release()
        if mem is not None:
            mem.reset_peak_memory_stats()
            base["resident_gib_before"] = round(mem.memory_allocated() / GiB, 2)
        start = time.perf_counter()
        step: Step | None = None
        try:
            step = build()
            synchronize()
            build_s = time.perf_counter() - start
            for _ in range(a.warmup):
                step.run()
            times = []
            for _ in range(a.steps):
                synchronize()
                t = time.perf_counter()
                step.run()
                synchronize()
                times.append(time.perf_counter() - t)
        except Exception as err:  # recorded, and the run goes on with the next measurement
            oom = _is_oom(err)
            if not oom:
                self.failed += 1
                traceback.print_exc()
            what = "out of device memory" if oom else f"{type(err).__name__}: {err}"
            return self.emit({**base, "error": what.splitlines()[0][:300]})
        finally:
            del step
            _release()
        record = {**base, **self.figures(spec, shape, times)}
        record.update(
            build_s=round(build_s, 2),
            peak_mem_gib=None if mem is None else round(mem.max_memory_allocated() / GiB, 2),
        )
        return self.emit(record)

    def figures(self, spec: ModelSpec, shape: Batches, times: list[float]) -> dict:
        per_token = flops_per_token(spec, shape.seq)
        attention = 12 * spec.num_layers * shape.seq * spec.num_attention_heads * spec.kv_channels
        step = statistics.median(times)
        tflops = per_token * shape.tokens / step / 1e12
        return {
            "step_s": round(step, 5),
            "step_s_min": round(min(times), 5),
            "steps": len(times),
            "step_times_s": [round(t, 5) for t in times],
            "tokens_per_step": shape.tokens,
            "tokens_per_s": round(shape.tokens / step, 1),
            "flops_per_token": per_token,
            "attention_share": round(attention / per_token, 4),
            "model_tflops": round(tflops, 3),
            "mfu": None if self.peak.tflops is None else round(tflops / self.peak.tflops, 4),
            **({} if self.peak.tflops else {"mfu_reason": self.peak.reason}),
        }

    def ratio(self, shape_name: str, what: str, top: dict, bottom: dict) -> None:
        base = {"kind": "ratio", "shape": shape_name, "what": what}
        if "tokens_per_s" not in top or "tokens_per_s" not in bottom:
            self.skip(base, "a side has no measurement")
            return
        self.emit({**base, "value": round(top["tokens_per_s"] / bottom["tokens_per_s"], 3)})


def _is_oom(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError; torch_npu raises a RuntimeError saying so."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def _release() -> None:
    """Give the last model's memory back before the next one is built."""
    gc.collect()
    mem = memory_module()
    if mem is not None:
        mem.empty_cache()


def with_steps(step: Step, base: dict) -> Step:
    base.update(
        kernels=step.kernels,
        parameters=step.parameters,
        trained=step.trained,
        optimizer=step.optimizer,
    )
    return step


def run_shape(bench: Bench, name: str, spec: ModelSpec, device_name: str) -> None:
    a = bench.a
    full = Batches(a.seq, a.micro_batch_size, a.micro_batches)
    packed = replace(full, segments=a.segments)
    common = {"kind": "step", "shape": name, "layers": spec.num_layers, "seq": a.seq,
              "micro_batch_size": a.micro_batch_size, "micro_batches": a.micro_batches}  # fmt: skip
    runs, skipped = kernel_choices(device_name)

    def mtrain(kernels: str, variant: str, shape: Batches, lora: bool = False) -> dict:
        base = {**common, "impl": "mtrain", "kernels": kernels, "variant": variant}
        if variant == "packed":
            base["segments"] = shape.segments
        return bench.measure(
            base, spec, shape, lambda: with_steps(mtrain_step(spec, kernels, shape, lora), base)
        )

    results: dict[str, dict] = {}
    for k in KERNELS:
        if k in skipped:
            bench.skip({**common, "impl": "mtrain", "kernels": k, "variant": "full"}, skipped[k])
        elif k != "local":
            results[k] = mtrain(k, "full", full)
    base = {**common, "impl": "hf", "kernels": "sdpa", "variant": "full"}
    hf = bench.measure(base, spec, full, lambda: with_steps(hf_step(spec, full), base))
    best = next(k for k in KERNELS if k in runs)  # local always runs
    lora_kernels = "sdpa" if best == "te" else best  # LoRA needs the unfused norms (no te)
    results_packed = mtrain(best, "packed", packed)
    results_lora = mtrain(lora_kernels, "lora", full, lora=True)
    if "local" in runs:
        results["local"] = mtrain("local", "full", full)
    for k in runs:
        bench.ratio(name, f"mtrain {k} / hf", results[k], hf)
    bench.ratio(name, f"packed / unpacked ({best})", results_packed, results[best])
    bench.ratio(name, f"lora / full ({lora_kernels})", results_lora, results[lora_kernels])


# --- output ------------------------------------------------------------------------------------


def table(records: list[dict]) -> str:
    head = (f"{'shape':<6} {'impl':<6} {'kernels':<7} {'variant':<7} {'ms/step':>9} "
            f"{'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in (r for r in records if r["kind"] == "step"):
        left = f"{r['shape']:<6} {r['impl']:<6} {r['kernels']:<7} {r['variant']:<7} "
        if "step_s" not in r:
            lines.append(left + f"{r.get('error') or 'skipped: ' + r['skipped']}"[:100])
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        lines.append(
            left + f"{1e3 * r['step_s']:>9.1f} {r['tokens_per_s']:>10.0f} "
            f"{r['model_tflops']:>8.1f} {mfu:>6} {mem:>8}"
        )
    lines.append("")
    for r in (r for r in records if r["kind"] == "ratio"):
        value = f"{r['value']:.3f}" if "value" in r else "n/a (" + r["skipped"] + ")"
        lines.append(f"{r['shape']:<6} {r['what']:<32} {value}")
    return "\n".join(lines)


def header(device_name: str, peak) -> dict:
    import megatron.core
    import transformers

    info = accel.current().describe()
    mem = memory_module()
    total = None if mem is None else mem.get_device_properties(0).total_memory / GiB
    return {
        "kind": "device",
        "device": device_name,
        "name": info.get("gpu") or info.get("npu") or platform.processor() or platform.machine(),
        "memory_gib": None if total is None else round(total, 1),
        "peak_tflops": peak.tflops,
        "peak_source": peak.reason,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_core": megatron.core.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "npu"])
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny model, seq 64, every path in seconds (on CPU unless --device)",
    )
    p.add_argument(
        "--shapes", default=",".join(PRESETS), help="comma list of " + ", ".join(PRESETS)
    )
    p.add_argument("--layers", help=f"SHAPE=N,... (default {LAYERS})")
    for name, (acc, tiny) in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {acc} ({tiny} tiny)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    p.add_argument("--budget-s", type=float, help="start no measurement after this many seconds")
    p.add_argument("--out", help="also write the JSON lines here")
    a = p.parse_args(argv)
    if a.tiny and a.device == "auto":
        a.device = "cpu"
    for name, (acc, tiny) in DEFAULTS.items():
        if getattr(a, name) is None:
            setattr(a, name, tiny if a.tiny else acc)
        if getattr(a, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')}={getattr(a, name)} is too small")
    if not 1 <= a.segments <= a.seq // 2:
        p.error(f"--segments={a.segments} must be in [1, --seq / 2 = {a.seq // 2}]")
    return a


def main(argv: list[str] | None = None) -> int:
    a = arguments(argv)
    try:
        device_name = accel.resolve(a.device)
        specs = shapes(a)
    except ConfigError as err:
        print(f"bench/gpu.py: {err}", file=sys.stderr)
        return 2
    accel.activate(device_name)
    parallel.init(1, 1)
    info = accel.current().describe()
    peak = lookup(info.get("gpu") or info.get("npu"))
    if a.peak_tflops:
        peak = type(peak)(a.peak_tflops, f"--peak-tflops {a.peak_tflops:g}")
    out = open(a.out, "w") if a.out else None  # noqa: SIM115 (closed below)
    bench = Bench(a, peak, out)
    try:
        bench.emit(header(device_name, peak))
        for name, spec in specs.items():
            run_shape(bench, name, spec, device_name)
        print("\n" + table(bench.records), flush=True)
        print(f"\n{len(bench.records)} lines in {bench.elapsed():.0f} s", flush=True)
    finally:
        if out is not None:
            out.close()
        parallel.shutdown()
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
