"""A vocabulary that TP does not divide: the rows hf2mcore pads it with never count.

A tiny tied Qwen3 with 301 tokens is padded to 302 rows at TP=2. PT, SFT and DPO at TP=2 must
give the loss curves (and DPO's log-prob metrics) of TP=1 on the same data, to a relative 1e-5;
an unmasked zero row adds one class to every softmax and moves the first PT loss by 5.7e-4.
"""

from __future__ import annotations

import pytest

from converters import hf2mcore
from converters.hf2mcore import HF2McoreConfig
from mtrain.models.tiny import write_chat_task, write_corpus, write_preference_task
from tests.conftest import tiny_spec
from tests.torchrun import run_many

pytestmark = pytest.mark.slow
VOCAB = 301
ITERS = 3
TOLERANCE = 1e-5


STAGES = {  # stage: (data file, extra overrides, keys compared)
    "pt": ("corpus.jsonl", {}, ("loss",)),
    "sft": ("chat.jsonl", {}, ("loss",)),
    "dpo": (
        "pairs.jsonl",
        {"dpo.sft_weight": 1.0},
        ("loss", "logps/chosen", "logps/rejected", "rewards/margin"),
    ),
}


@pytest.fixture(scope="module")
def curves(tiny_hf, tmp_path_factory):
    """{(stage, tp): metrics per iteration}; every run in one torchrun of 2 processes (TP=1 runs
    there at DP=2, the same tokens per step)."""
    root = tmp_path_factory.mktemp("odd_vocab")
    hf = tiny_hf(tiny_spec(vocab_size=VOCAB))
    for tp in (1, 2):
        hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(root / f"c{tp}"), tp=tp))
    write_corpus(root / "corpus.jsonl", 300, seed=3)
    write_chat_task(root / "chat.jsonl")
    write_preference_task(root / "pairs.jsonl")
    plan = {}
    for stage, (data, extra, _) in STAGES.items():
        for tp in (1, 2):
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
                **extra,
            }
            plan[f"{stage}-{tp}"] = [stage, [f"{k}={v}" for k, v in args.items()]]
    results, _ = run_many(2, plan, root)
    return {(stage, tp): results[f"{stage}-{tp}"] for stage in STAGES for tp in (1, 2)}


@pytest.mark.parametrize("stage", STAGES)
def test_tp2_equals_tp1(curves, stage):
    one, two = curves[stage, 1], curves[stage, 2]
    assert len(one) == len(two) == ITERS
    for a, b in zip(one, two):
        for key in STAGES[stage][2]:
            assert abs(a[key] - b[key]) <= TOLERANCE * max(1.0, abs(a[key])), (key, a, b)
