"""DPO on CPU processes: the loss and its gradient against plain PyTorch on the HF model, the
two reference modes against each other, and learning a synthetic preference."""

from __future__ import annotations

import json
import math

import pytest

from converters import hf2mcore
from converters.hf2mcore import HF2McoreConfig
from mtrain.models.tiny import write_kto_task, write_preference_task
from tests.conftest import TINY, tiny_spec
from tests.torchrun import run_many, torchrun

pytestmark = pytest.mark.slow
ITERS = 20


def test_dpo_loss_and_gradient_equal_plain_pytorch_on_the_hf_model_at_tp2pp2(tiny_hf, tmp_path):
    """sigmoid (with label smoothing and an SFT term), ipo, hinge, and the relatives SimPO,
    ORPO and KTO (tests/test_preference_losses.py checks their formulas against TRL's); every
    parameter's gradient gathered into HF layout. fp32, relative tolerance 1e-5."""
    hf = tiny_hf(tiny_spec(tie_word_embeddings=False))
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(tmp_path / "c"), tp=2, pp=2))
    torchrun("dpo_parity.py", 4, tmp_path / "result.json", hf, tmp_path / "c")
    results = json.loads((tmp_path / "result.json").read_text())
    assert set(results) == {"sigmoid", "ipo", "hinge", "simpo", "orpo", "kto"}
    for kind, r in results.items():
        assert r["loss"] <= 1e-5 * max(1.0, abs(r["loss_value"])), (kind, r)
        assert r["grad"] <= 1e-5 * max(1.0, r["grad_scale"]), (kind, r)


VALIDATED = {  # 8 training pairs, 4 held out; the first step runs at lr 0 (warm-up)
    "data.val_ratio": 0.34,
    "eval.interval": 1,
    "train.iters": 3,
    "train.global_batch_size": 4,
    "train.warmup_iters": 2,
}
LORA = {"finetuning_type": "lora", "train.lr": 1e-2, "train.iters": 10}
MODEL = {"dpo.reference": "model"}
KTO = {"dpo.loss": "kto", "dpo.beta": 1.0, "train.iters": 4}
REFERENCE_FREE = {
    "simpo": {"dpo.beta": 2.0, "dpo.gamma": 0.5, "train.iters": 20},
    "orpo": {"train.iters": 12},
}


@pytest.fixture(scope="module")
def setup(tiny_hf, tmp_path_factory):
    """Every DPO run of this module, in order, in one torchrun (tests/dist/runs.py); each
    writes its metrics file, which the tests read (training and validation lines)."""
    root = tmp_path_factory.mktemp("dpo")
    hf = tiny_hf(TINY)
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(root / "c"), tp=2, pp=2))
    write_preference_task(root / "pairs.jsonl")
    write_kto_task(root / "kto_samples.jsonl")
    runs = {
        "precompute": {},
        "model": MODEL,
        "lora_model": {**LORA, **MODEL},
        "lora_pre": LORA,
        "resumed_part": {"train.exit_after_iters": 8, "save": root / "resumed"},
        "resumed": {},
        "val_pre": VALIDATED,
        "val_model": {**VALIDATED, **MODEL},
        "kto_pre": {**KTO, "data.path": root / "kto_samples.jsonl"},
        "kto_model": {**KTO, **MODEL, "data.path": root / "kto_samples.jsonl"},
    }
    for loss, extra in REFERENCE_FREE.items():
        cache = {"data.cache_dir": root / f"cache_{loss}"}
        runs[loss] = {**extra, "train.lr": 3e-3, "dpo.loss": loss, **cache}
    plan = {name: ["dpo", overrides(root, hf, name, **extra)] for name, extra in runs.items()}
    run_many(4, plan, root, timeout=1200)
    return root, hf


def overrides(root, hf, name: str, **extra) -> list[str]:
    args = {
        "+model": "qwen3_tiny",
        "model.hf_dir": hf,
        "load": root / "c",
        "save": root / name,
        "data.path": root / "pairs.jsonl",
        "data.cache_dir": root / "cache",
        "train.iters": ITERS,
        "train.seq_length": 32,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        "train.lr": 1e-3,
        "train.precision": "fp32",
        "parallel.tp": 2,
        "parallel.pp": 2,
        "device": "cpu",
        "log.metrics_file": root / f"{name}.jsonl",
        **extra,
    }
    return [f"{k}={v}" for k, v in args.items()]


def metrics(setup, name: str) -> list[dict]:
    lines = (setup[0] / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def precomputed(setup):
    return metrics(setup, "precompute")


def test_a_tiny_model_learns_the_preference(precomputed):
    """12 reversal pairs (chosen: the reversal, rejected: the string as it was)."""
    assert len(precomputed) == ITERS
    assert precomputed[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    last = precomputed[-5:]
    assert sum(h["rewards/accuracy"] for h in last) / len(last) >= 0.9, last
    assert all(h["rewards/margin"] > 0.2 for h in last), last


def test_precomputed_and_model_references_give_identical_curves(setup, precomputed):
    frozen = metrics(setup, "model")
    for key in ("loss", "rewards/margin", "grad_norm"):
        diffs = [abs(a[key] - b[key]) for a, b in zip(precomputed, frozen)]
        assert len(diffs) == ITERS and max(diffs) < 1e-5, (key, diffs)


def test_lora_dpo_with_adapters_off_as_reference_equals_precompute(setup):
    off, pre = metrics(setup, "lora_model"), metrics(setup, "lora_pre")
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(off, pre)) < 1e-5
    assert off[-1]["rewards/margin"] > off[0]["rewards/margin"]


def test_resumed_dpo_reuses_the_reference_cache_and_reproduces_the_curve(setup, precomputed):
    """The same save= twice: the first run stops after 8 steps, the second resumes it."""
    first, second = metrics(setup, "resumed_part"), metrics(setup, "resumed")
    assert len(first) == 8
    assert [h["loss"] for h in first + second] == [h["loss"] for h in precomputed]


def split(history: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training lines, validation lines) of a metrics file."""
    return [h for h in history if "loss" in h], [h for h in history if "eval/loss" in h]


def test_validation_pairs_get_their_own_reference_pass(setup):
    """After the lr-0 first step the policy is the reference: every validation pair's margin is
    0 and the loss log 2, which holds only if each validation pair is compared with its own
    reference log-probs. Then the precomputed and the frozen-copy reference evaluate alike."""
    pre_train, pre_eval = split(metrics(setup, "val_pre"))
    model_train, model_eval = split(metrics(setup, "val_model"))
    assert [h["iteration"] for h in pre_eval] == [1, 2, 3]
    assert pre_eval[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(pre_eval[0]["eval/rewards/margin"]) < 1e-6
    assert pre_eval[-1]["eval/rewards/margin"] != pytest.approx(0.0, abs=1e-4)
    for a, b in zip(pre_eval + pre_train, model_eval + model_train):
        for key in a:
            assert abs(a[key] - b.get(key, math.inf)) < 1e-5, (key, a, b)


def test_reference_free_losses_train_the_preference(setup):
    """SimPO and ORPO run without any reference pass; SimPO learns the preference in 20 steps,
    ORPO (mostly the chosen responses' NLL at its default weight) makes them likelier in 12."""
    root, _ = setup
    for loss in REFERENCE_FREE:
        history = metrics(setup, loss)
        assert not (root / f"cache_{loss}" / "dpo_reference").exists()  # no reference pass ran
        first, last = history[0], history[-4:]
        if loss == "simpo":
            assert sum(h["rewards/margin"] for h in last) / 4 > 1.0, history
            assert sum(h["rewards/accuracy"] for h in last) / 4 >= 0.9, history
        else:
            assert last[-1]["loss"] < 0.8 * first["loss"], history
            assert last[-1]["logps/chosen"] > first["logps/chosen"] + 2.0, history


def test_kto_reference_modes_agree_and_start_at_half(setup):
    """KTO on the pairs split into unpaired samples (chosen desirable, rejected not): at the
    start the policy is the reference, so the KL estimate and every reward are 0 and each loss
    1 - sigmoid(0) = 0.5; the precomputed and the frozen-copy reference (both rows of every
    sample, the mismatched one included) give the same curve."""
    pre, frozen = metrics(setup, "kto_pre"), metrics(setup, "kto_model")
    assert pre[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert pre[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert pre[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert pre[-1]["kl"] > 0.01  # the policy has moved away from the reference
    for a, b in zip(pre, frozen):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-5, (key, a, b)
