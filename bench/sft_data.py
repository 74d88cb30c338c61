"""SFT preprocessing throughput against the bare HF tokenizer, by `data.workers`, and padding waste
with packing.

    python bench/sft_data.py [--work DIR] [--conversations 20000] [--repeat 3] [--workers 1,2]
                             [--one-thread] [--seq 4096]

Writes the tiny byte-level BPE tokenizer (its ChatML chat template is what `data.template=auto`
picks) and a JSONL file of synthetic OpenAI-format conversations (system prompt half of the
time, 1 to 3 turns), then times, best of `--repeat`:
  raw  `tokenizer(texts)["input_ids"]` on the conversations already rendered by the same
       template (texts in memory; fast tokenizer, its own thread pool on every core);
  sft  `build_sft_datasets` into a fresh cache, once per `--workers` count: loading the
       tokenizer, hashing and reading the file, parsing and checking every record, rendering
       every prefix the loss mask needs, tokenizing, placing the masks, writing the cache, and
       building the dataset; with N > 1 workers also starting the N worker processes.
Prints each in samples/s and tokens/s (the same tokens), the ratio sft/raw at one worker
(target >= 0.9), the speed-up of each worker count over one (target: near-linear while cores
last), and checks that every worker count wrote the same cache bytes. With one worker the
tokenizer's threads already use every core, so on a small machine more workers gain little;
`--one-thread` gives the tokenizer one thread in every process (raw included), which shows how
the worker processes themselves scale, core for core.

Then, on a length-skewed set (Pareto-distributed answer lengths: mostly short, a long tail),
the fraction of pad tokens in the training sequences of `--seq` tokens without and with
packing (target with packing <= 5%).

The script imports neither torch nor the model code at its top: spawned worker processes
re-run the main module's imports, and would otherwise pay for them at every start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtrain.config.sft_data import SFTDataConfig  # noqa: E402
from mtrain.data.templates import resolve_template  # noqa: E402


def conversations(n: int, seed: int, skew: bool) -> list[list[dict]]:
    from mtrain.models.tiny import corpus

    rng = random.Random(seed)
    lines = corpus(lines=20000, seed=seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(lines) for _ in range(k))

    out = []
    for _ in range(n):
        conv = [{"role": "system", "content": text(1)}] if rng.random() < 0.5 else []
        for _ in range(rng.choice([1, 1, 2, 3])):
            answer = min(int(rng.paretovariate(1.1) * 3), 400) if skew else rng.randint(3, 12)
            conv += [
                {"role": "user", "content": text(rng.randint(1, 4))},
                {"role": "assistant", "content": text(answer)},
            ]
        out.append(conv)
    return out


def write_jsonl(path: Path, convs: list[list[dict]]) -> None:
    with open(path, "w") as f:
        for conv in convs:
            f.write(json.dumps({"messages": conv}) + "\n")


def digest(cache: Path) -> str:
    """sha256 of every data file of the cache entries in `cache` (not the .json, which holds
    the time taken)."""
    h = hashlib.sha256()
    for f in sorted(cache.glob("chat-*")):
        if f.suffix != ".json":
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def main() -> None:
    from mtrain.data.sft import build_sft_datasets
    from mtrain.models.tiny import build_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--conversations", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="data.workers counts to time, e.g. 1,2,4")
    parser.add_argument("--one-thread", action="store_true", help="one tokenizer thread each")
    parser.add_argument("--seq", type=int, default=4096, help="seq_length for the padding figures")
    args = parser.parse_args()
    if args.one_thread:  # before the first encoding; spawned workers inherit it
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    counts = [int(w) for w in args.workers.split(",")]
    if 1 not in counts:
        counts.insert(0, 1)

    work = Path(args.work or tempfile.mkdtemp(prefix="mtrain_bench_sft_"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(work / "tok")
    convs = conversations(args.conversations, seed=1, skew=False)
    write_jsonl(work / "chat.jsonl", convs)
    size = (work / "chat.jsonl").stat().st_size
    threads = "one tokenizer thread per process" if args.one_thread else "tokenizer threads: all"
    print(
        f"data: {len(convs):,} conversations, {size / 1e6:.1f} MB JSONL; {os.cpu_count()} cores, "
        f"{threads}; load average {os.getloadavg()[0]:.1f}"
    )

    texts = resolve_template("auto", tokenizer).render(convs, False)
    tokenizer(texts[:100])  # warm-up
    raw, ours, digests = [], {w: [] for w in counts}, {}
    for i in range(args.repeat):  # interleaved, so a busy spell on the machine hits all
        start = time.perf_counter()
        ids = tokenizer(texts)["input_ids"]
        raw.append(time.perf_counter() - start)
        tokens = sum(map(len, ids))
        del ids
        line = f"round {i + 1}: raw tokenizer {raw[-1]:.2f} s"
        for w in counts:
            cache = work / f"cache{i}-{w}"
            shutil.rmtree(cache, ignore_errors=True)
            config = SFTDataConfig(path=str(work / "chat.jsonl"), cache_dir=str(cache), workers=w)
            start = time.perf_counter()
            train, _ = build_sft_datasets(config, str(work / "tok"), 1 << 16, seed=0)
            ours[w].append(time.perf_counter() - start)
            assert train.stats["tokens"] == tokens and train.stats["samples"] == len(convs)
            digests.setdefault(digest(cache), []).append(w)
            shutil.rmtree(cache)
            line += f", sft {w} worker(s) {ours[w][-1]:.2f} s"
        print(line)

    rows = [("raw tokenizer(texts)", min(raw))]
    rows += [(f"sft, {w} worker(s)", min(ours[w])) for w in counts]
    for name, seconds in rows:
        print(
            f"{name:>22}: {len(convs) / seconds:10,.0f} samples/s {tokens / seconds:12,.0f} "
            f"tokens/s ({seconds:.2f} s)"
        )
    print(f"ratio sft / raw, 1 worker: {min(raw) / min(ours[1]):.2f}  (target >= 0.9)")
    for w in counts[1:]:
        print(
            f"speed-up, {w} workers over 1: {min(ours[1]) / min(ours[w]):.2f}x "
            f"(sft / raw {min(raw) / min(ours[w]):.2f})"
        )
    same = "yes" if len(digests) == 1 else f"NO: {sorted(digests.values())}"
    print(f"same cache bytes for every worker count: {same}; load average {os.getloadavg()[0]:.1f}")

    skewed = conversations(max(args.conversations // 2, 1000), seed=2, skew=True)
    write_jsonl(work / "skewed.jsonl", skewed)
    waste = {}
    for packing in (False, True):
        config = SFTDataConfig(
            path=str(work / "skewed.jsonl"), cache_dir=str(work / "cache"), packing=packing
        )
        train, _ = build_sft_datasets(config, str(work / "tok"), args.seq, seed=0)
        waste[packing] = train.stats
    lengths = train.lengths
    print(
        f"skewed set: {len(skewed):,} samples, tokens per sample: median "
        f"{int(np.median(lengths))}, max {int(lengths.max())}; seq_length {args.seq}"
    )
    for packing, s in waste.items():
        print(
            f"  packing={str(packing).lower():5}: {s['sequences']:,} sequences, "
            f"padding {s['padding']:.1%}" + ("  (target <= 5%)" if packing else "")
        )
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
