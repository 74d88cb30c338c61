"""A vocabulary that TP does not divide: the rows hf2mcore pads it with never count.

A tiny tied Qwen3 with 301 tokens is padded to 302 rows at TP=2. PT, SFT and DPO at TP=2 must
give the loss curves (and DPO's log-prob metrics) of TP=1 on the same data, to a relative 1e-5;
an unmasked zero row adds one class to every softmax and moves the first PT loss by 5.7e-4.
"""

from __future__ import annotations

import json

import pytest

from converters import hf2mcore
from converters.hf2mcore import HF2McoreConfig
from mtrain.models.tiny import write_chat_task, write_corpus, write_preference_task
from tests.conftest import tiny_spec
from tests.torchrun import launch

pytestmark = pytest.mark.slow
VOCAB = 301
ITERS = 3
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def setup(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("odd_vocab")
    hf = tiny_hf(tiny_spec(vocab_size=VOCAB))
    for tp in (1, 2):
        hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(root / f"c{tp}"), tp=tp))
    write_corpus(root / "corpus.jsonl", 300, seed=3)
    write_chat_task(root / "chat.jsonl")
    write_preference_task(root / "pairs.jsonl")
    return root, hf


def run(setup, stage: str, tp: int, data: str, **extra) -> list[dict]:
    root, hf = setup
    metrics = root / f"{stage}_tp{tp}.jsonl"
    metrics.unlink(missing_ok=True)
    args = {
        "+model": "qwen3_tiny",
        "model.hf_dir": hf,
        "model.vocab_size": VOCAB,
        "load": root / f"c{tp}",
        "data.path": root / data,
        "data.cache_dir": root / f"cache_tp{tp}",
        "train.iters": ITERS,
        "train.seq_length": 32,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 2,
        "train.lr": 1e-3,
        "train.precision": "fp32",
        "parallel.tp": tp,
        "parallel.pp": 1,
        "device": "cpu",
        "log.metrics_file": metrics,
        **extra,
    }
    launch(tp, "-m", f"mtrain.{stage}", *(f"{k}={v}" for k, v in args.items()))
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def assert_same_curves(one: list[dict], two: list[dict], keys: tuple[str, ...]) -> None:
    assert len(one) == len(two) == ITERS
    for a, b in zip(one, two):
        for key in keys:
            assert abs(a[key] - b[key]) <= TOLERANCE * max(1.0, abs(a[key])), (key, a, b)


def test_pretraining_at_tp2_equals_tp1(setup):
    assert_same_curves(
        run(setup, "pt", 1, "corpus.jsonl"), run(setup, "pt", 2, "corpus.jsonl"), ("loss",)
    )


def test_sft_at_tp2_equals_tp1(setup):
    assert_same_curves(
        run(setup, "sft", 1, "chat.jsonl"), run(setup, "sft", 2, "chat.jsonl"), ("loss",)
    )


def test_dpo_at_tp2_equals_tp1(setup):
    keys = ("loss", "logps/chosen", "logps/rejected", "rewards/margin")
    assert_same_curves(
        run(setup, "dpo", 1, "pairs.jsonl", **{"dpo.sft_weight": 1.0}),
        run(setup, "dpo", 2, "pairs.jsonl", **{"dpo.sft_weight": 1.0}),
        keys,
    )
