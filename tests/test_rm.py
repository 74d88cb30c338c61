"""Reward models on CPU processes: learning a preference that generalises to held-out pairs,
the HF export against the megatron model (scores, loss, gradients) in transformers, HF reward
models as a starting point at another layout, freeze and LoRA."""

from __future__ import annotations

import json
import math

import pytest

from converters import hf2mcore
from converters.hf2mcore import HF2McoreConfig
from mtrain.models.tiny import write_reward_task
from tests.conftest import TINY
from tests.torchrun import launch, run_many, torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    hf = tiny_hf(TINY)
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(root / "c"), tp=2, pp=2))
    write_reward_task(root / "rm.jsonl")  # 64 pairs: 48 to train on, 16 held out
    return root, hf


def rm_overrides(setup, name: str, **extra) -> list[str]:
    root, hf = setup
    args = {
        "+model": "qwen3_tiny",
        "model.hf_dir": hf,
        "load": root / "c",
        "save": root / name,
        "data.path": root / "rm.jsonl",
        "data.cache_dir": root / "cache",
        "data.val_ratio": 0.25,
        "train.seq_length": 32,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        "train.lr": 1e-3,
        "train.precision": "fp32",
        "parallel.tp": 2,
        "parallel.pp": 2,
        "device": "cpu",
        "log.metrics_file": root / f"{name}.jsonl",
        "checkpoint.save_hf": "true",
        **extra,
    }
    return [f"{k}={v}" for k, v in args.items()]


def rm_metrics(setup, name: str) -> tuple[list[dict], list[dict]]:
    """(training lines, validation lines) of a `mtrain.rm` run's metrics file."""
    lines = [json.loads(line) for line in (setup[0] / f"{name}.jsonl").read_text().splitlines()]
    return [h for h in lines if "loss" in h], [h for h in lines if "eval/loss" in h]


@pytest.fixture(scope="module")
def trained(setup):
    """The full and the LoRA reward model, trained in one torchrun (tests/dist/runs.py)."""
    root, _ = setup
    full = {"train.iters": 20, "eval.interval": 10, "rm.center_coef": 0.01}
    lora = {"train.iters": 6, "train.lr": 1e-2, "finetuning_type": "lora"}
    plan = {name: ["rm", rm_overrides(setup, name, **extra)]
            for name, extra in (("full", full), ("lora", lora))}  # fmt: skip
    run_many(4, plan, root, timeout=900)
    history, evals = rm_metrics(setup, "full")
    return history, evals, root / "full"


def test_a_tiny_reward_model_learns_held_out_preferences(trained):
    """Chosen responses carry a marker letter; 16 held-out pairs of prompts never trained on."""
    history, evals, _ = trained
    assert len(history) == 20 and [e["iteration"] for e in evals] == [10, 20]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # a fresh head: ~0
    assert evals[-1]["eval/rewards/accuracy"] >= 0.9, evals
    assert evals[-1]["eval/rewards/margin"] > 1.0, evals


def test_exports_score_and_train_as_the_megatron_models_at_tp2pp2(setup, trained):
    """The exported HF models (full, and LoRA merged) in transformers against the megatron
    checkpoints they came from, on a fixed batch with margins and the centring term: rewards
    and loss to 1e-5, and (full) every parameter's gradient to 1e-5 relative."""
    root, _ = setup
    _, _, full = trained
    exports = []
    for name, iteration in (("full", 20), ("lora", 6)):
        hf = root / name / f"iter_{iteration:07d}" / "hf"
        config = json.loads((hf / "config.json").read_text())
        assert config["architectures"] == ["Qwen3ForSequenceClassification"]
        assert config["num_labels"] == 1 and config["pad_token_id"] is not None
        exports += [hf, root / name]
    torchrun("rm_parity.py", 4, root / "parity.json", *exports)
    results = json.loads((root / "parity.json").read_text())
    for name, r in zip(("full", "lora"), results):
        assert r["rewards"] <= 1e-5 * max(1.0, r["reward_scale"]), (name, r)
        assert r["loss"] <= 1e-5 * max(1.0, r["loss_value"]), (name, r)
    assert results[0]["grad"] <= 1e-5 * max(1.0, results[0]["grad_scale"]), results[0]


def test_an_hf_reward_model_trains_further_at_another_layout_with_freeze(setup, trained):
    """load= the exported HF reward model, at TP1 x PP1 with freeze: after a step at lr 0
    (warm-up) the held-out metrics equal those of the TP2 x PP2 run it was exported from."""
    _, evals, full = trained
    further = rm_overrides(
        setup, "further",
        **{"load": full / "iter_0000020" / "hf", "parallel.tp": 1, "parallel.pp": 1,
           "train.iters": 3, "train.warmup_iters": 1, "eval.interval": 1, "rm.center_coef": 0.01,
           "finetuning_type": "freeze", "freeze.trainable": "[layers.-1:]"},
    )  # fmt: skip
    launch(1, "-m", "mtrain.rm", *further)
    history, again = rm_metrics(setup, "further")
    for key in ("eval/loss", "eval/rewards/margin", "eval/rewards/accuracy"):
        assert again[0][key] == pytest.approx(evals[-1][key], abs=1e-5), key
    assert history[-1]["loss"] < history[0]["loss"]
