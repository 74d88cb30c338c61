"""The training loop on CPU processes: the runs that are compared number for number share two
torchruns (4 processes, 1 process; tests/dist/runs.py, as `python -m mtrain.pt` runs them), the
rest (crash, SIGTERM, NaN) go through the real `python -m mtrain.pt` command alone.

Every run starts from a checkpoint converted from the same tiny HF model and reads the same
tokenized corpus, in fp32, so layouts can be compared number for number.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from converters import hf2mcore, mcore2hf
from converters.hf2mcore import HF2McoreConfig
from converters.mcore2hf import McoreToHFConfig
from mtrain.models.tiny import corpus
from tests.conftest import TINY
from tests.torchrun import DIST_DIR, ENV, launch, run_many

pytestmark = pytest.mark.slow
ITERS = 12


@pytest.fixture(scope="module")
def setup(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    hf = tiny_hf(TINY)
    with open(root / "corpus.jsonl", "w") as f:
        for line in corpus(2000, seed=1):
            f.write(json.dumps({"text": line}) + "\n")
    for tp, pp in ((1, 1), (2, 2)):
        hf2mcore.convert(
            HF2McoreConfig(hf_dir=str(hf), out_dir=str(root / f"c{tp}{pp}"), tp=tp, pp=pp)
        )
    hf2mcore.convert(
        HF2McoreConfig(hf_dir=str(hf), out_dir=str(root / "c22_vpp2"), tp=2, pp=2, vpp=2)
    )
    return root, hf


def overrides(setup, tp: int, pp: int, **extra) -> list[str]:
    root, hf = setup
    args = {
        "+model": "qwen3_tiny",
        "model.hf_dir": hf,
        "load": root / f"c{tp}{pp}",
        "data.path": root / "corpus.jsonl",
        "data.cache_dir": root / "cache",
        "train.iters": ITERS,
        "train.seq_length": 64,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        "train.precision": "fp32",
        "train.lr": 1e-3,
        "parallel.tp": tp,
        "parallel.pp": pp,
        "parallel.distributed_optimizer": "true",
        "device": "cpu",
        "log.interval": 4,
        **extra,
    }
    return [f"{k}={v}" for k, v in args.items() if v is not None]


def run_pt(
    setup,
    nproc: int,
    tp: int,
    pp: int,
    name: str,
    script: list[str] | None = None,
    check: bool = True,
    **extra,
) -> tuple[list[dict], subprocess.CompletedProcess]:
    metrics = setup[0] / f"{name}.jsonl"
    metrics.unlink(missing_ok=True)
    proc = launch(
        nproc,
        *(script or ["-m", "mtrain.pt"]),
        *overrides(setup, tp, pp, **{"log.metrics_file": metrics, **extra}),
        check=check,
    )
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return [json.loads(line) for line in lines], proc


def losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history]


def shared_runs(setup, nproc: int, plan: dict[str, dict]) -> tuple[dict, str]:
    """Run {name: overrides given to `overrides` (tp, pp and extras)} in one torchrun of
    `nproc` processes; returns ({name: metrics per iteration}, its output)."""
    root = setup[0]
    runs = {}
    for name, extra in plan.items():
        extra = dict(extra)
        tp, pp = extra.pop("tp"), extra.pop("pp")
        runs[name] = ["pt", overrides(setup, tp, pp, **extra)]
    return run_many(nproc, runs, root, name=f"runs{nproc}")


RESUME = {"checkpoint.keep_last": 1, "checkpoint.save_interval": 3}


@pytest.fixture(scope="module")
def four(setup):
    """The runs on 4 processes. tp2pp2 is the reference the others are held to."""
    root = setup[0]
    save = root / "resume_ckpt"
    freeze = {"freeze.trainable": "[layers.-1:,output_layer]", "train.iters": 3}
    return shared_runs(
        setup,
        4,
        {
            "tp2pp2": dict(tp=2, pp=2),
            "vpp2": dict(tp=2, pp=2, load=root / "c22_vpp2", **{"parallel.vpp": 2}),
            "dp4": dict(tp=1, pp=1),  # 1 micro-batch of 2 per step on each rank
            # The job is resubmitted with the very same command line: `save` wins over `load`.
            "part1": dict(tp=2, pp=2, save=save, **{"train.exit_after_iters": 5}, **RESUME),
            "part2": dict(tp=2, pp=2, save=save, **RESUME),
            "freeze": dict(
                tp=2, pp=2, save=root / "freeze_ckpt", finetuning_type="freeze", **freeze
            ),
        },
    )


@pytest.fixture(scope="module")
def one(setup):
    """The runs on 1 process."""
    bf16 = {"train.iters": 1, "train.precision": "bf16", "train.lr": 0.0, "train.min_lr": 0.0}
    return shared_runs(
        setup,
        1,
        {
            "tp1pp1": dict(tp=1, pp=1),  # also DP=1: 4 micro-batches of 2 per step
            "bf16": dict(tp=1, pp=1, save=setup[0] / "bf16_ckpt", **bf16),
            "epochs": dict(tp=1, pp=1, **{"train.iters": None, "train.epochs": 0.25}),
        },
    )


@pytest.fixture(scope="module")
def reference(four):
    """TP=2 x PP=2 on 4 processes, uninterrupted: the curve the other runs are held to."""
    return four[0]["tp2pp2"]


def test_loss_decreases_on_a_small_corpus(reference):
    assert len(reference) == ITERS
    first, last = reference[0]["loss"], reference[-1]["loss"]
    assert last < first - 0.3, losses(reference)


def test_tp2pp2_and_tp1pp1_give_the_same_loss_curve(one, reference):
    diffs = [abs(a - b) for a, b in zip(losses(reference), losses(one[0]["tp1pp1"]))]
    assert len(diffs) == ITERS and max(diffs) < 1e-4, diffs


def test_interleaved_schedule_gives_the_same_loss_curve(four, reference):
    """PP=2 x VPP=2 (1 layer per chunk) vs plain 1F1B: with PP=2 both pipeline neighbours are
    one rank, where batched p2p could swap activations and gradients."""
    diffs = [abs(a - b) for a, b in zip(losses(reference), losses(four[0]["vpp2"]))]
    assert len(diffs) == ITERS and max(diffs) < 1e-5, diffs


def test_dp4_equals_dp1_with_four_times_the_micro_batches(one, four):
    dp1, dp4 = one[0]["tp1pp1"], four[0]["dp4"]
    diffs = [abs(a - b) for a, b in zip(losses(dp1), losses(dp4))]
    assert len(diffs) == ITERS and max(diffs) < 1e-5, diffs


def test_interrupted_and_resumed_training_reproduces_the_loss_sequence(setup, four, reference):
    (runs, out), save = four, setup[0] / "resume_ckpt"
    first, second = runs["part1"], runs["part2"]
    assert len(first) == 5 and "resumed at iteration 5" in out
    # keep_last=1 pruned 3 when 5 was saved, and 5 when the last one was.
    assert sorted(p.name for p in save.glob("iter_*")) == [f"iter_{ITERS:07d}"]
    assert losses(first) + losses(second) == losses(reference)  # exactly


def test_a_crash_during_save_leaves_the_previous_checkpoint_loadable(setup):
    root = setup[0]
    save = root / "crash_ckpt"
    _, proc = run_pt(
        setup,
        1,
        1,
        1,
        "crash",
        script=[str(DIST_DIR / "crash_in_save.py")],
        check=False,
        save=save,
        **{"checkpoint.save_interval": 3},
    )
    assert proc.returncode != 0
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (save / ".partial_iter_0000006").is_dir() and not (save / "iter_0000006").exists()
    mcore2hf.convert(McoreToHFConfig(ckpt_dir=str(save), out_dir=str(root / "crash_hf")))
    resumed, proc = run_pt(
        setup, 1, 1, 1, "after_crash", save=save, **{"checkpoint.save_interval": 3}
    )
    assert "resumed at iteration 3" in proc.stderr and len(resumed) == ITERS - 3
    assert not (save / ".partial_iter_0000006").exists()


def test_sigterm_saves_a_checkpoint_and_exits_0(setup):
    root, _ = setup
    save, metrics = root / "sigterm_ckpt", root / "sigterm.jsonl"
    metrics.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mtrain.pt",
        *overrides(setup, 1, 1, save=save, **{"train.iters": 10_000, "log.metrics_file": metrics}),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV}
    )
    deadline = time.time() + 120
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 2
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    iteration = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= iteration < 10_000 and (save / f"iter_{iteration:07d}").is_dir()
    assert "SIGTERM" in err


def test_bf16_finetune_starts_from_the_loaded_weights(setup, one):
    """At lr=0 a step must leave the weights as loaded: the optimizer's fp32 master copy has to
    come from the checkpoint, not from the random init the model was built with."""
    import torch

    from tests.test_convert import hf_tensors

    root, hf = setup
    save = root / "bf16_ckpt"
    assert len(one[0]["bf16"]) == 1
    out = root / "bf16_hf"
    mcore2hf.convert(McoreToHFConfig(ckpt_dir=str(save), out_dir=str(out)))
    original, trained = hf_tensors(hf), hf_tensors(out)
    assert sorted(original) == sorted(trained)
    assert any(t.dtype == torch.bfloat16 for t in trained.values())
    for name, tensor in original.items():  # bf16 matrices; megatron keeps some norms in fp32
        assert torch.equal(trained[name], tensor.to(trained[name].dtype)), name


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nan_loss_stops_naming_the_iteration_or_is_skipped(setup, monkeypatch, mode):
    monkeypatch.setenv("NAN_AT", "3")
    monkeypatch.setenv("MICRO_BATCHES", "4")  # global batch 8 / micro-batch 2, one DP rank
    history, proc = run_pt(
        setup,
        1,
        1,
        1,
        f"nan_{mode}",
        script=[str(DIST_DIR / "nan_at_step.py")],
        check=False,
        **{"train.on_nan": mode, "train.iters": 4},
    )
    if mode == "stop":  # the worker exits 2; torchrun reports any failed worker as 1
        assert proc.returncode != 0 and len(history) == 2
        assert "error: iteration 3: loss is nan; stopping" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert len(history) == 4 and "skipped 1" in proc.stderr
        assert "grad_norm" not in history[2] and "grad_norm" in history[3]


def test_epochs_set_the_iterations_from_the_data_size(setup, one):
    from transformers import AutoTokenizer

    root, hf = setup
    tokenizer = AutoTokenizer.from_pretrained(hf)
    texts = [json.loads(line)["text"] for line in open(root / "corpus.jsonl")]
    tokens = sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts)  # + end of document
    expected = int(0.25 * ((tokens - 1) // 64) / 8)
    assert len(one[0]["epochs"]) == expected > 0


def test_freeze_trains_only_the_named_parameters(setup, four):
    """TP=2 x PP=2: the last layer and the (tied) embedding train, everything else comes out of
    training bit-identical."""
    import torch

    from tests.test_convert import hf_tensors

    root, hf = setup
    save = root / "freeze_ckpt"
    assert len(four[0]["freeze"]) == 3
    mcore2hf.convert(McoreToHFConfig(ckpt_dir=str(save), out_dir=str(root / "freeze_hf")))
    before, after = hf_tensors(hf), hf_tensors(root / "freeze_hf")
    trained = {n for n in before if not torch.equal(before[n], after[n])}
    expected = {n for n in before if n.startswith("model.layers.3.") or "embed_tokens" in n}
    assert trained == expected


@pytest.mark.parametrize("tp, pp, nproc", [(2, 2, 4), (1, 1, 2)])
def test_validation_loss_and_accuracy_equal_the_hf_models(setup, tp, pp, nproc):
    root, hf = setup
    result = root / f"eval_{tp}{pp}.json"
    launch(nproc, DIST_DIR / "eval_parity.py", hf, root / f"c{tp}{pp}", tp, pp, result)
    out = json.loads(result.read_text())
    for key in ("eval/loss", "eval/accuracy"):
        assert abs(out["ours"][key] - out["reference"][key]) < 1e-5, (key, out)
