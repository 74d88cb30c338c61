"""PT tokenization throughput of `mtrain.prepare` against the bare HF tokenizer, same texts.

    python bench/prepare.py [--work DIR] [--mb 50] [--workers NCORES] [--repeat 3]

Writes a synthetic JSONL corpus (pseudo-English documents of about 1 KB) and the tiny byte-level
BPE tokenizer, then times, best of `--repeat`:
  raw      `tokenizer(texts)["input_ids"]` on all documents at once, fast tokenizer, its own
           thread pool on every core (texts already in memory, nothing written);
  backend  the tokenizer's Rust backend alone (`encode_batch_fast`, 1000 documents a call), the
           ceiling for any pipeline around it; for reference;
  prepare  `python -m mtrain.prepare` with `data.workers` = cores, as it reports itself: loading
           the tokenizer, hashing the file, starting the worker pool, reading and parsing the
           file, tokenizing, appending EOD and writing .bin/.idx to a fresh cache (only the
           interpreter's own start-up and imports before `main` are left out).
Prints each in tokens/s (the same tokens, EODs not counted) and prepare's ratio to each
(target: prepare / raw >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtrain.models.tiny import build_tokenizer, corpus  # noqa: E402


def write_corpus(path: Path, megabytes: float) -> list[str]:
    lines = corpus(lines=int(megabytes * 1e6 / 62), seed=1)
    docs = [" ".join(lines[i : i + 16]) for i in range(0, len(lines), 16)]
    with open(path, "w") as f:
        for doc in docs:
            f.write(json.dumps({"id": len(doc), "text": doc}) + "\n")
    return docs


def run_prepare(work: Path, cache: Path, workers: int) -> tuple[float, int]:
    """(seconds, tokens) that `python -m mtrain.prepare` reports for tokenizing the corpus."""
    cmd = [
        sys.executable, "-m", "mtrain.prepare", f"data.path={work / 'corpus.jsonl'}",
        f"tokenizer={work / 'tok'}", f"data.cache_dir={cache}", f"data.workers={workers}",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stderr
    found = re.search(r"([\d,]+) tokens -> .*\(tokenized in ([\d.]+) s", out)
    if not found:
        raise RuntimeError(f"no timing in mtrain.prepare's output:\n{out}")
    return float(found[2]), int(found[1].replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB of text")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="mtrain_bench_prepare_"))
    work.mkdir(parents=True, exist_ok=True)
    build_tokenizer(work / "tok")
    docs = write_corpus(work / "corpus.jsonl", args.mb)
    size = (work / "corpus.jsonl").stat().st_size
    print(f"corpus: {len(docs):,} documents, {size / 1e6:.1f} MB JSONL; {os.cpu_count()} cores")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(work / "tok"))
    backend = tokenizer.backend_tokenizer
    raw_tokens = sum(map(len, tokenizer(docs[:100])["input_ids"]))  # warm-up
    # Rounds interleave the three measurements, so a busy spell on the machine hits all of them.
    raw, bare, ours = [], [], []
    for i in range(args.repeat):
        start = time.perf_counter()
        ids = tokenizer(docs)["input_ids"]
        raw.append(time.perf_counter() - start)
        raw_tokens = sum(map(len, ids))
        del ids

        start = time.perf_counter()
        for j in range(0, len(docs), 1000):
            backend.encode_batch_fast(docs[j : j + 1000])
        bare.append(time.perf_counter() - start)

        cache = work / f"cache{i}"
        shutil.rmtree(cache, ignore_errors=True)
        seconds, tokens = run_prepare(work, cache, args.workers)
        assert tokens == raw_tokens + len(docs)  # the same ids, plus one EOD per document
        ours.append(seconds)
        shutil.rmtree(cache)
        print(
            f"round {i + 1}: raw {raw[-1]:.2f} s, backend {bare[-1]:.2f} s, prepare {seconds:.2f} s"
        )

    raw_rate, backend_rate = raw_tokens / min(raw), raw_tokens / min(bare)
    our_rate = raw_tokens / min(ours)  # the same tokens, EODs not counted
    print(f"raw HF tokenizer (batch, all cores): {raw_rate:,.0f} tokens/s  ({min(raw):.2f} s)")
    print(
        f"bare tokenizers backend (encode_batch_fast, 1000 docs a call, all cores): "
        f"{backend_rate:,.0f} tokens/s"
    )
    print(
        f"mtrain.prepare (workers={args.workers}, incl. .bin/.idx): {our_rate:,.0f} tokens/s  "
        f"({min(ours):.2f} s)"
    )
    print(f"ratio prepare / raw: {our_rate / raw_rate:.2f}  (target >= 0.8)")
    print(f"ratio prepare / bare backend: {our_rate / backend_rate:.2f}")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
