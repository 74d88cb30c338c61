"""Converted checkpoints in megatron-core (CPU, torchrun) give the HF model's logits."""

from __future__ import annotations

import json

import pytest

from converters import hf2mcore, mcore2hf
from converters.hf2mcore import HF2McoreConfig
from converters.mcore2hf import McoreToHFConfig
from tests.conftest import tiny_spec
from tests.torchrun import torchrun

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5  # fp32


def to_mcore(hf, out, tp, pp):
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(out), tp=tp, pp=pp))
    return out


def run_parity(tmp_path, hf, layouts: dict[str, object]) -> dict[str, float]:
    torchrun("parity.py", 4, tmp_path / "result.json", hf, *layouts.values())
    raw = json.loads((tmp_path / "result.json").read_text())
    return {name: raw[str(ckpt)] for name, ckpt in layouts.items()}


def test_logits_match_hf_at_every_layout_and_after_resharding(tiny_hf, tmp_path):
    hf = tiny_hf(tiny_spec(tie_word_embeddings=False, vocab_size=509))  # padded vocab at TP=2
    c22 = to_mcore(hf, tmp_path / "tp2pp2", 2, 2)
    # Resharding goes through HF: TP2PP2 -> HF -> TP1PP2.
    back = tmp_path / "hf_back"
    mcore2hf.convert(McoreToHFConfig(ckpt_dir=str(c22), out_dir=str(back)))
    layouts = {
        "tp2pp2": c22,
        "tp2pp1": to_mcore(hf, tmp_path / "tp2pp1", 2, 1),
        "tp1pp2": to_mcore(hf, tmp_path / "tp1pp2", 1, 2),
        "resharded_tp1pp2": to_mcore(back, tmp_path / "re_tp1pp2", 1, 2),
    }
    diffs = run_parity(tmp_path, hf, layouts)
    assert set(diffs) == set(layouts)
    assert all(d < TOLERANCE for d in diffs.values()), diffs


def test_logits_match_hf_for_tied_qwen2_with_qkv_bias(tiny_hf, tmp_path):
    hf = tiny_hf(tiny_spec(family="qwen2"))
    diffs = run_parity(tmp_path, hf, {"tp2pp2": to_mcore(hf, tmp_path / "c", 2, 2)})
    assert diffs["tp2pp2"] < TOLERANCE, diffs
