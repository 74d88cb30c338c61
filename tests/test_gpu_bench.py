"""bench/gpu.py, the accelerator benchmark, runs every path on CPU; its MFU inputs are right.

The GPU run itself happens on a lent machine (bench/README.md); here the `--tiny` run must
produce every measurement line the device run will, and the FLOP count and peak table it divides
by are checked against independent counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtrain.accel.peak import PEAK_TFLOPS, lookup, peak_tflops
from mtrain.models.spec import hf_config_from_spec
from mtrain.progress import flops_per_token
from tests.conftest import tiny_spec

ROOT = Path(__file__).resolve().parent.parent
STEPS = [  # (impl, kernels, variant) of every timed step the tiny run must report
    ("mtrain", "sdpa", "full"),
    ("mtrain", "local", "full"),
    ("hf", "sdpa", "full"),
    ("mtrain", "sdpa", "packed"),
    ("mtrain", "sdpa", "lora"),
]
RATIOS = ["mtrain sdpa / hf", "mtrain local / hf", "packed / unpacked (sdpa)", "lora / full (sdpa)"]


def test_tiny_run_reports_every_measurement(tmp_path):
    out = tmp_path / "tiny.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "bench/gpu.py", "--tiny", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert printed == records  # the file holds exactly the lines the run printed

    (device,) = [r for r in records if r["kind"] == "device"]
    assert device["device"] == "cpu" and device["peak_tflops"] is None
    steps = {(r["impl"], r["kernels"], r["variant"]): r for r in records if r["kind"] == "step"}
    for key in STEPS:
        r = steps[key]
        assert "error" not in r and "skipped" not in r, r
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["steps"] == 2, r
        assert r["tokens_per_step"] == 64 * 1 * 2 and r["flops_per_token"] > 0
        assert r["mfu"] is None and "peak" in r["mfu_reason"]  # CPU: no peak, so no MFU
    # transformer_engine is not installed here: te gets a line saying so, not a measurement.
    assert "transformer_engine" in steps[("mtrain", "te", "full")]["skipped"]
    assert steps[("mtrain", "sdpa", "packed")]["segments"] == 4
    lora, full = steps[("mtrain", "sdpa", "lora")], steps[("mtrain", "sdpa", "full")]
    assert 0 < lora["trained"] < full["trained"] == full["parameters"]
    assert steps[("hf", "sdpa", "full")]["parameters"] == full["parameters"]  # the same model
    ratios = {r["what"]: r for r in records if r["kind"] == "ratio"}
    assert sorted(ratios) == sorted(RATIOS)
    hf = steps[("hf", "sdpa", "full")]["tokens_per_s"]
    assert ratios["mtrain sdpa / hf"]["value"] == pytest.approx(full["tokens_per_s"] / hf, 1e-2)
    assert all(r["value"] > 0 for r in ratios.values())
    assert "tokens/s" in done.stdout and "MFU" in done.stdout  # the closing table


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_is_6n_of_the_hf_models_matmuls_plus_attention(tied):
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    spec = tiny_spec(num_layers=2, tie_word_embeddings=tied)
    raw = hf_config_from_spec(spec)
    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[raw.pop("model_type")](**raw))
    # N: the weights of every matmul, counted on the built model: its linear layers (lm_head
    # included, which with tied embeddings is the embedding matrix, counted once).
    linears = {
        id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
    }
    n = sum(linears.values())
    # The same N from the total: all parameters less the norms and an untied embedding lookup.
    total = sum(p.numel() for p in model.parameters())
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    lookup_rows = 0 if tied else model.get_input_embeddings().weight.numel()
    assert n == total - norms - lookup_rows
    s, h = 64, spec.hidden_size
    # By hand, per layer: q and o h*h each (4 heads of 32 = 128 = 2h here), k and v h*64, fc1
    # and fc2 3*h*ffn; plus the output layer vocab*h.
    q = spec.num_attention_heads * spec.kv_channels
    kv = spec.num_query_groups * spec.kv_channels
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * spec.ffn_hidden_size
    assert n == spec.num_layers * per_layer + spec.vocab_size * h
    # Attention: QK^T and attention-times-V, 2 * s * q multiply-adds each per token forward,
    # times 3 for forward + backward, over the full s x s square (no causal halving).
    attention = 3 * 2 * 2 * spec.num_layers * s * q
    assert flops_per_token(spec, s) == 6 * n + attention


def test_known_devices_have_their_datasheet_peak_and_unknown_ones_a_reason():
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H20") == 148.0  # not H200's, though "H20" starts it
    assert peak_tflops("NVIDIA A800-SXM4-80GB") == 312.0
    assert peak_tflops("Ascend910B3") == 313.0
    known = lookup("NVIDIA L40S")
    assert known.tflops == 362.0 and "peak.py" in known.reason
    unknown = lookup("NVIDIA GeForce GTX 1080")
    assert unknown.tflops is None
    assert "GTX 1080" in unknown.reason and "peak_tflops" in unknown.reason
    assert lookup(None).tflops is None and lookup(None).reason
    # More specific names first: no entry is shadowed by an earlier one it contains.
    keys = [k.replace(" ", "") for k, _ in PEAK_TFLOPS]
    assert all(keys[j] not in keys[i] for i in range(len(keys)) for j in range(i))
