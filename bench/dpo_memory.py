"""DPO's reference modes side by side: peak memory of `precompute` against `model`, and the time
of the precompute pass against one training epoch.

    python bench/dpo_memory.py [--work DIR] [--hidden 1024] [--layers 12] [--finetuning full]

Builds a random Qwen3-shaped model (about 150M parameters at the defaults, fp32, tied) with the
tiny tokenizer, converts it, writes 210 string-reversal preference pairs, then runs the same
one-epoch `python -m mtrain.dpo` (one CPU process, TP=1 PP=1) twice, with dpo.reference=model and
with dpo.reference=precompute (cache cleared first). Each run reports its process's peak RSS
(VmHWM) and its RSS once everything is imported but before the model exists, so the figures
show both the whole process and the part that training adds (model, gradients, optimizer,
reference, activations). Target: precompute / model <= 0.6.

What to expect: the `model` reference adds one copy of the weights (4 bytes per parameter in
fp32) to training's weights + gradients + Adam state (16 bytes per parameter), so for full
fine-tuning the ratio of the training part is about 16/20 = 0.8; with LoRA, `model` means the
policy with its adapters off, which costs nothing, so the ratio is about 1.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converters import hf2mcore  # noqa: E402
from converters.hf2mcore import HF2McoreConfig  # noqa: E402
from mtrain.config.model import load_preset  # noqa: E402
from mtrain.models.tiny import build_model, write_preference_task  # noqa: E402

GiB = 1024**3
# Runs mtrain.dpo in this process and reports its memory: VmRSS once imports are done (the
# baseline) and VmHWM at exit.
CHILD = """
import atexit, json, sys
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
import torch, megatron.core, transformers, mtrain.dpo, mtrain.trainer  # noqa: the baseline
baseline = status('VmRSS')
atexit.register(lambda: print('MEMORY ' + json.dumps({'baseline': baseline, 'peak': status('VmHWM')})))
sys.argv = ['mtrain.dpo'] + sys.argv[1:]
mtrain.dpo.main()
"""


def run(args: list[str]) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT
    )
    out = proc.stdout + proc.stderr
    if proc.returncode:
        raise SystemExit(f"mtrain.dpo failed:\n{out[-3000:]}")
    memory = json.loads(re.search(r"MEMORY (\{.*\})", out).group(1))
    return memory, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--finetuning", choices=("full", "lora"), default="full")
    opts = parser.parse_args()
    work = opts.work or Path(tempfile.mkdtemp(prefix="dpo_memory_"))
    try:
        h = opts.hidden
        spec = replace(
            load_preset("qwen3_tiny").spec(),
            num_layers=opts.layers, hidden_size=h, ffn_hidden_size=3 * h,
            num_attention_heads=h // 64, num_query_groups=h // 128, kv_channels=64,
        )  # fmt: skip
        build_model(work / "hf", spec, seed=0)
        hf2mcore.convert(HF2McoreConfig(hf_dir=str(work / "hf"), out_dir=str(work / "base")))
        write_preference_task(work / "pairs.jsonl", letters="abcdef", length=3)
        common = [
            "+model=qwen3_tiny", f"model.num_layers={spec.num_layers}",
            f"model.hidden_size={h}", f"model.ffn_hidden_size={3 * h}",
            f"model.num_attention_heads={h // 64}", f"model.num_query_groups={h // 128}",
            "model.kv_channels=64", f"model.hf_dir={work / 'hf'}", f"load={work / 'base'}",
            f"data.path={work / 'pairs.jsonl'}", f"data.cache_dir={work / 'cache'}",
            "parallel.tp=1", "parallel.pp=1", "device=cpu", "train.epochs=1",
            "train.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=4",
            "train.precision=fp32", "train.lr=1e-4", "log.interval=1000",
            f"finetuning_type={opts.finetuning}",
        ]  # fmt: skip
        results = {}
        for mode in ("model", "precompute"):
            shutil.rmtree(work / "cache" / "dpo_reference", ignore_errors=True)
            memory, out = run([*common, f"dpo.reference={mode}"])
            done = re.search(r"done: (\d+) iterations in \S+ \(([\d.]+) s/iter\)", out)
            memory["epoch_s"] = int(done.group(1)) * float(done.group(2))
            pre = re.search(r"reference log-probs of (\d+) pairs in ([\d.]+) s", out)
            memory["precompute_s"] = float(pre.group(2)) if pre else None
            results[mode] = memory
        params = sum(
            p.numel()
            for p in __import__("transformers")
            .AutoModelForCausalLM.from_pretrained(work / "hf")
            .parameters()
        )
        model, pre = results["model"], results["precompute"]
        print(
            f"DPO, {opts.finetuning} fine-tuning of a {params / 1e6:.0f}M-parameter model (fp32, "
            "1 CPU process), one epoch of 210 pairs, seq 32"
        )
        print(f"{'reference':<11}{'peak RSS GiB':>14}{'above baseline GiB':>20}{'epoch s':>9}")
        for mode, r in results.items():
            print(
                f"{mode:<11}{r['peak'] / GiB:>14.2f}{(r['peak'] - r['baseline']) / GiB:>20.2f}"
                f"{r['epoch_s']:>9.1f}"
            )
        whole = pre["peak"] / model["peak"]
        added = (pre["peak"] - pre["baseline"]) / (model["peak"] - model["baseline"])
        print(
            f"precompute / model peak memory: {whole:.2f} (whole process), {added:.2f} (above "
            f"the import baseline); target <= 0.6: {'met' if added <= 0.6 else 'NOT met'}"
        )
        print(
            f"precompute pass {pre['precompute_s']:.1f} s = {pre['precompute_s'] / pre['epoch_s']:.2f}"
            f" of one training epoch ({pre['epoch_s']:.1f} s)"
        )
    finally:
        if opts.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
