"""PT data: raw corpora -> cached Megatron indexed datasets -> GPT windows -> blends -> batches.

References are independent: the tokenizer's own `tokenizer(text)["input_ids"]`, megatron-core's
`IndexedDataset` reader, and windows cut from the token stream in plain Python.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrain.config.data import DataConfig
from mtrain.data import corpus, pt, sources
from mtrain.data.indexed import IndexedTokens
from mtrain.data.pt import BlendedDataset, PTDataset, blend, build_pt_dataset, prepare_corpus
from mtrain.data.sampler import micro_batches
from mtrain.errors import ConfigError, DataError
from mtrain.models.tiny import build_tokenizer
from mtrain.models.tiny import corpus as sentences

ROOT = Path(__file__).resolve().parent.parent


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = sentences(lines=4 * n, seed=seed)
    docs = [" ".join(lines[i : i + rng.randint(1, 7)]) for i in range(0, 4 * n, 4)]
    docs[1] = "naïve café — ünïcödé 🙂 text"  # multi-byte UTF-8 survives every format
    return docs


def write(path: Path, docs: list[str], key: str = "text") -> Path:
    fmt = sources.format_of(path)
    records = [{"id": i, key: d} for i, d in enumerate(docs)]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "json":
        path.write_text(json.dumps(records, indent=1))
    elif fmt == "txt":
        path.write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=7)
    return path


def prepare(path, tok_dir, cache, **kw) -> Path:
    (prefix,) = prepare_corpus(DataConfig(path=str(path), cache_dir=str(cache), **kw), str(tok_dir))
    return prefix


def files(prefix: Path) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


# --- tokenizing and the cache -------------------------------------------------------------------


def test_indexed_dataset_is_read_by_megatron_and_matches_the_tokenizer(tmp_path, tok_dir, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = make_docs(50)
    prefix = prepare(write(tmp_path / "c.jsonl", docs), tok_dir, tmp_path / "cache")
    theirs = IndexedDataset(str(prefix))
    assert len(theirs) == len(docs)
    assert list(theirs.document_indices) == list(range(len(docs) + 1))
    for i, doc in enumerate(docs):
        assert theirs[i].tolist() == tok(doc)["input_ids"] + [tok.eos_token_id]
    assert theirs[0].dtype == np.uint16  # Megatron's choice for a vocabulary under 65500


@pytest.mark.parametrize("fmt", ["json", "parquet", "txt"])
def test_every_format_gives_the_same_dataset(tmp_path, tok_dir, fmt):
    docs = make_docs(40)
    reference = prepare(write(tmp_path / "c.jsonl", docs), tok_dir, tmp_path / "cache")
    other = prepare(write(tmp_path / f"c.{fmt}", docs), tok_dir, tmp_path / "cache")
    assert other != reference
    assert files(other) == files(reference)


def test_empty_texts_are_skipped_and_eod_is_optional(tmp_path, tok_dir, tok):
    docs = ["first document", "", "third document"]
    prefix = prepare(
        write(tmp_path / "c.jsonl", docs), tok_dir, tmp_path / "cache", append_eod=False
    )
    data = IndexedTokens(prefix)
    assert [data.get(i).tolist() for i in range(len(data))] == [
        tok("first document")["input_ids"],
        tok("third document")["input_ids"],
    ]


def test_second_call_hits_the_cache(tmp_path, tok_dir, monkeypatch):
    path = write(tmp_path / "c.jsonl", make_docs(30))
    first = prepare(path, tok_dir, tmp_path / "cache")

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized although cached")

    with monkeypatch.context() as m:
        m.setattr(corpus.Tokenization, "_load", refuse)
        assert prepare(path, tok_dir, tmp_path / "cache") == first
        # The prepared prefix itself, or its .bin/.idx, are accepted as inputs too.
        for given in (first, f"{first}.bin", f"{first}.idx"):
            assert prepare(given, tok_dir, tmp_path / "elsewhere") == first


def test_changed_file_tokenizer_or_text_key_misses_the_cache(tmp_path, tok_dir):
    docs = make_docs(30)
    records = [{"text": d, "title": d[:10]} for d in docs]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cache = tmp_path / "cache"
    base = prepare(path, tok_dir, cache)

    other_tok = tmp_path / "tok2"
    build_tokenizer(other_tok, vocab_size=300)
    assert prepare(path, other_tok, cache) != base
    by_title = prepare(path, tok_dir, cache, text_key="title")
    assert by_title != base and files(by_title) != files(base)
    assert prepare(path, tok_dir, cache, append_eod=False) != base

    path.write_text(path.read_text().replace("the", "a"))
    changed = prepare(path, tok_dir, cache)
    assert changed != base and files(changed) != files(base)


@pytest.mark.parametrize("fmt", ["jsonl", "txt", "json", "parquet"])
def test_two_workers_write_byte_identical_output(tmp_path, tok_dir, fmt, monkeypatch):
    # Small chunks, so lines straddle chunk borders and the workers really share the file.
    monkeypatch.setattr(sources, "MIN_CHUNK_BYTES", 999)
    monkeypatch.setattr(sources, "BATCH_DOCS", 37)
    path = write(tmp_path / f"c.{fmt}", make_docs(400))
    one = prepare(path, tok_dir, tmp_path / "one", workers=1)
    two = prepare(path, tok_dir, tmp_path / "two", workers=2)
    assert files(one) == files(two)
    assert len(IndexedTokens(two)) == 400


def test_interrupted_tokenization_leaves_no_cache_entry(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setattr(sources, "MIN_CHUNK_BYTES", 999)
    path = write(tmp_path / "c.jsonl", make_docs(200))
    calls = []

    def crash_on_second_chunk(chunk, *args):
        calls.append(chunk)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(chunk, *args)

    real = corpus.encode_chunk
    monkeypatch.setattr(corpus, "encode_chunk", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare(path, tok_dir, tmp_path / "cache")
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name != "hashes"]
    assert leftovers == []
    monkeypatch.setattr(corpus, "encode_chunk", real)
    assert len(IndexedTokens(prepare(path, tok_dir, tmp_path / "cache"))) == 200


# --- bad input ----------------------------------------------------------------------------------


def put(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _jsonl(tmp_path, lines: list[str]) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


BAD_INPUTS = {
    "malformed-json-line": (
        lambda t: _jsonl(t, ['{"text": "a"}', "", '{"text": "b"', '{"text": "c"}']),
        DataError, r"corpus\.jsonl:3: not valid JSON \(Expecting ',' delimiter at column 13\)",
    ),
    "record-without-text": (
        lambda t: _jsonl(t, ['{"text": "a"}', '{"body": "b"}']),
        DataError, r"corpus\.jsonl:2: no field 'text' \(fields: 'body'\); set data.text_key",
    ),
    "text-not-a-string": (
        lambda t: _jsonl(t, ['{"text": 5}']),
        DataError, r"corpus\.jsonl:1: field 'text' is int, not a string",
    ),
    "json-record-without-text": (
        lambda t: write(t / "corpus.json", ["a", "b"], key="body"),
        DataError, r"corpus\.json: record 1: no field 'text'",
    ),
    "json-not-a-list": (
        lambda t: put(t / "corpus.json", '{"text": "a"}'),
        DataError, r"corpus\.json: expected a JSON list of records, got dict",
    ),
    "parquet-without-column": (
        lambda t: write(t / "corpus.parquet", ["a", "b"], key="body"),
        DataError, r"corpus\.parquet: no column 'text' \(columns: id, body\)",
    ),
    "empty-corpus": (
        lambda t: _jsonl(t, ["", '{"text": ""}']),
        DataError, r"corpus\.jsonl: no documents",
    ),
    "missing-file": (
        lambda t: t / "nope.jsonl",
        DataError, r"nope\.jsonl: no such file, and no prepared .*nope\.jsonl\.bin/\.idx",
    ),
    "unknown-extension": (
        lambda t: put(t / "corpus.csv", "text\na\n"),
        DataError, r"corpus\.csv: unknown input; expected a \.jsonl, \.json, \.parquet, \.txt file",
    ),
    "bin-without-idx": (
        lambda t: put(t / "data.bin", ""),
        DataError, r"data\.bin: a prepared dataset needs both .*data\.bin and .*data\.idx",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_in_one_line(tmp_path, tok_dir, case):
    make, error, message = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(error, match=message) as err:
        prepare(path, tok_dir, tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache").glob("*.bin*"))


@pytest.mark.parametrize(
    "weights, message",
    [
        ([1.0], r"data.weights gives 1 weight\(s\) for 2 path\(s\)"),
        ([1.0, -0.5], r"data.weights=\[1.0, -0.5\] has a negative weight -0.5"),
        ([0.0, 0.0], r"sum to zero"),
    ],
)
def test_bad_weights_are_refused_before_any_work(tmp_path, tok_dir, weights, message):
    cfg = DataConfig(path=["a.jsonl", "b.jsonl"], weights=weights, cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        build_pt_dataset(cfg, str(tok_dir), seq_length=8, num_samples=10, seed=0)


def test_error_line_number_counts_lines_of_earlier_chunks(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setattr(sources, "MIN_CHUNK_BYTES", 999)
    lines = [json.dumps({"text": d}) for d in make_docs(300)]
    lines[250] = '{"txt": "oops"}'
    with pytest.raises(DataError, match=r"corpus\.jsonl:251: no field 'text'"):
        prepare(_jsonl(tmp_path, lines), tok_dir, tmp_path / "cache", workers=2)


# --- samples ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefix(tok_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pt")
    return prepare(write(tmp / "c.jsonl", make_docs(60)), tok_dir, tmp / "cache")


def stream_of(prefix: Path, docs: np.ndarray) -> list[int]:
    """The documents in `docs` order, concatenated, read by megatron's own reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(str(prefix))
    return [t for d in docs for t in data[int(d)].tolist()]


@pytest.mark.parametrize("epochs", [1, 3])
def test_samples_are_the_windows_of_the_shuffled_token_stream(prefix, epochs):
    seq, data = 16, IndexedTokens(prefix)
    n = (epochs * data.num_tokens - 1) // seq  # as many as `epochs` epochs of documents hold
    ds = PTDataset(prefix, seq_length=seq, num_samples=n, seed=7)
    assert len(ds) == n and len(ds.docs) == epochs * len(data)
    for e in range(epochs):  # each epoch is a permutation of all the documents
        epoch = ds.docs[e * len(data) : (e + 1) * len(data)]
        assert sorted(epoch) == list(range(len(data))) and list(epoch) != sorted(epoch)
    stream = stream_of(prefix, ds.docs)
    windows = [tuple(stream[j * seq : j * seq + seq + 1]) for j in range(n)]
    samples = []
    for i in range(n):
        s = ds[i]
        assert s["tokens"].shape == s["labels"].shape == (seq,)
        assert s["tokens"].dtype == s["labels"].dtype == s["position_ids"].dtype == torch.int64
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])
        assert torch.equal(s["loss_mask"], torch.ones(seq))
        assert torch.equal(s["position_ids"], torch.arange(seq))
        samples.append(tuple(s["tokens"].tolist()) + (s["labels"][-1].item(),))
    assert Counter(samples) == Counter(windows)  # every window exactly once ...
    assert samples != windows  # ... in shuffled order


def test_same_seed_same_samples_different_seed_different(prefix, monkeypatch):
    def items(ds):
        return [ds[i]["tokens"] for i in range(len(ds))]

    first = items(PTDataset(prefix, seq_length=8, num_samples=100, seed=1))
    for cached in Path(prefix).parent.glob(f"{Path(prefix).name}.pt-*-seed1-*"):
        cached.unlink()  # rebuild, not reload
    again = PTDataset(prefix, seq_length=8, num_samples=100, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, items(again)))

    monkeypatch.setattr(pt, "build_index", None)  # the index is now read from its cache
    reloaded = PTDataset(prefix, seq_length=8, num_samples=100, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, items(reloaded)))
    monkeypatch.undo()

    other = items(PTDataset(prefix, seq_length=8, num_samples=100, seed=2))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_sample_index_for_a_million_documents_is_vectorized():
    lengths = np.random.default_rng(0).integers(1, 2000, size=1_000_000)
    docs, samples = pt.build_index(lengths, seq_length=4096, num_samples=500_000, seed=0)
    assert len(samples) == 500_000 and len(docs) % 1_000_000 == 0
    # Spot-check a few sample starts against a plain cumulative sum.
    ends = np.cumsum(lengths[docs])
    starts = sorted(int(ends[k] - lengths[docs[k]] + off) for k, off in samples[:50])
    assert all(s % 4096 == 0 for s in starts)


# --- blending -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, n", [([0.2, 0.5, 0.3], 1000), ([1.0, 0.0, 3.0], 7), ([5, 1, 1, 1, 1, 1, 1, 2], 997)]
)
def test_blend_follows_the_weights_in_every_prefix(weights, n):
    source, index = blend(weights, n)
    assert len(source) == n
    w = np.asarray(weights) / sum(weights)
    for k in range(len(w)):
        taken = np.cumsum(source == k)
        assert abs(taken[-1] - w[k] * n) < 1  # the totals, rounded by largest remainder
        assert np.all(np.abs(taken - w[k] * np.arange(1, n + 1)) <= 2)  # and on the way
        assert list(index[source == k]) == list(range(taken[-1]))  # in order, none skipped
    again, _ = blend(weights, n)
    assert np.array_equal(source, again)


def test_blended_dataset_draws_from_each_source_by_weight(tmp_path, tok_dir):
    a = write(tmp_path / "a.jsonl", make_docs(30, seed=1))
    b = write(tmp_path / "b.txt", make_docs(50, seed=2))
    cfg = DataConfig(path=[str(a), str(b)], weights=[1.0, 3.0], cache_dir=str(tmp_path / "c"))
    ds = build_pt_dataset(cfg, str(tok_dir), seq_length=8, num_samples=400, seed=3)
    assert isinstance(ds, BlendedDataset) and len(ds) == 400
    assert [len(d) for d in ds.datasets] == [100, 300]
    i = int(np.flatnonzero(ds.source == 1)[5])
    assert torch.equal(ds[i]["tokens"], ds.datasets[1][int(ds.index[i])]["tokens"])
    again = build_pt_dataset(cfg, str(tok_dir), seq_length=8, num_samples=400, seed=3)
    assert all(torch.equal(ds[i]["tokens"], again[i]["tokens"]) for i in range(len(ds)))

    cfg.weights = None  # default: proportional to tokens
    by_size = build_pt_dataset(cfg, str(tok_dir), seq_length=8, num_samples=400, seed=3)
    tokens = [IndexedTokens(d.data.prefix).num_tokens for d in by_size.datasets]
    assert abs(len(by_size.datasets[0]) - 400 * tokens[0] / sum(tokens)) <= 1


# --- micro-batches ------------------------------------------------------------------------------


class Numbered(torch.utils.data.Dataset):
    """Sample i is the number i, so batches can be compared by sample identity."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"tokens": torch.tensor([i, i]), "labels": torch.tensor([i, -i])}


def ids(batches) -> list[int]:
    return [int(t) for b in batches for t in b["tokens"][:, 0]]


def test_data_parallel_ranks_split_each_global_batch():
    ds, gbs, mbs = Numbered(64), 8, 2
    single = ids(islice(micro_batches(ds, 0, mbs, gbs, 0, 1), 4))  # one global batch
    assert single == list(range(8))
    ranks = [ids(islice(micro_batches(ds, 0, mbs, gbs, r, 2), 2)) for r in (0, 1)]
    assert ranks == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert sorted(ranks[0] + ranks[1]) == sorted(single)


def test_resuming_continues_exactly_where_an_uninterrupted_run_was():
    ds, gbs, mbs = Numbered(100), 12, 3
    for dp in (1, 2):
        steps = gbs // (mbs * dp)
        full = list(micro_batches(ds, 0, mbs, gbs, dp - 1, dp))
        resumed = list(micro_batches(ds, 3 * gbs, mbs, gbs, dp - 1, dp))
        assert ids(resumed) == ids(full[3 * steps :])
        assert len(full) == (100 // gbs) * steps  # the last, incomplete global batch is dropped
        assert all(b["tokens"].shape == (mbs, 2) for b in full)


def test_micro_batches_of_pt_samples_are_stacked(prefix):
    ds = PTDataset(prefix, seq_length=16, num_samples=32, seed=0)
    batch = next(micro_batches(ds, 0, 4, 16, 1, 2))
    assert batch["tokens"].shape == batch["loss_mask"].shape == (4, 16)
    assert torch.equal(batch["labels"][1], ds[5]["labels"])  # rank 1 starts at sample 4


def test_micro_batches_refuse_a_misaligned_resume():
    with pytest.raises(ConfigError, match="consumed_samples=10 is not a multiple"):
        next(micro_batches(Numbered(64), 10, 2, 8, 0, 1))
    with pytest.raises(ConfigError, match="global_batch_size=6 must be a positive multiple"):
        next(micro_batches(Numbered(64), 0, 2, 6, 0, 2))


# --- the command --------------------------------------------------------------------------------


def test_prepare_command_tokenizes_a_list_of_inputs(tmp_path, tok_dir):
    a = write(tmp_path / "a.jsonl", make_docs(20))
    b = write(tmp_path / "b.txt", make_docs(10))
    cmd = [
        sys.executable, "-m", "mtrain.prepare", f"data.path=[{a},{b}]", f"tokenizer={tok_dir}",
        f"data.cache_dir={tmp_path / 'cache'}", "data.workers=2",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "a.jsonl: 20 documents" in run.stderr and "b.txt: 10 documents" in run.stderr
    assert run.stderr.count("(tokenized in") == 2
    assert len(list((tmp_path / "cache").glob("*.idx"))) == 2

    bad = subprocess.run(cmd[:3] + [f"data.path={tmp_path / 'x.csv'}"] + cmd[4:], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'x.csv'}: no such file, and no prepared {tmp_path / 'x.csv'}.bin/.idx"
    ]
