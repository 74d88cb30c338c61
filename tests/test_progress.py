"""FLOPs accounting and the metric sinks of a training run."""

from __future__ import annotations

import json

import pytest

from mtrain.accel.peak import peak_tflops
from mtrain.config.model import load_preset
from mtrain.progress import Progress, flops_per_token


@pytest.mark.parametrize("preset", ["qwen3_0_6b", "qwen3_32b"])
def test_flops_are_6n_matmul_parameters_plus_attention(preset):
    spec = load_preset(preset).spec()
    h, L, s = spec.hidden_size, spec.num_layers, 4096
    norms = L * (2 * h + 2 * spec.kv_channels) + h
    # Every parameter but the norms (and an untied input embedding, a lookup) is a matmul weight.
    lookup = 0 if spec.tie_word_embeddings else spec.vocab_size * h
    matmul = spec.num_parameters() - norms - lookup
    attention = 12 * L * s * spec.num_attention_heads * spec.kv_channels
    assert flops_per_token(spec, s) == 6 * matmul + attention


def test_peak_table_matches_device_names():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("Ascend910B2") == 376.0
    assert peak_tflops("x86_64") is None and peak_tflops(None) is None


def test_metrics_file_and_tensorboard_receive_every_iteration(tmp_path):
    progress = Progress(
        total_iters=3,
        tokens_per_iter=100,
        flops_per_iter=1e9,
        devices=1,
        peak_tflops=100.0,
        interval=2,
        tensorboard_dir=str(tmp_path / "tb"),
        metrics_file=str(tmp_path / "m.jsonl"),
    )
    for it in (1, 2, 3):
        progress.step(it, {"loss": 5.0 - it, "lr": 1e-3})
    progress.summary()
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 3] and lines[2]["loss"] == 2.0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_wandb_run_is_recorded_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    progress = Progress(
        total_iters=1,
        tokens_per_iter=10,
        flops_per_iter=1.0,
        devices=1,
        peak_tflops=None,
        interval=1,
        wandb_project="mtrain-test",
        run_config={"train": {"lr": 1e-3}},
    )
    progress.step(1, {"loss": 1.5})
    progress.summary()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
