"""Packed samples (block-causal attention mask) against the same samples run alone."""

from __future__ import annotations

import json

import pytest

from converters import hf2mcore
from converters.hf2mcore import HF2McoreConfig
from tests.conftest import tiny_spec
from tests.torchrun import torchrun

pytestmark = pytest.mark.slow


def test_packed_loss_and_gradients_equal_unpacked(tiny_hf, tmp_path):
    hf = tiny_hf(tiny_spec(tie_word_embeddings=False))
    ckpt = tmp_path / "c"
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(ckpt), tp=2))
    torchrun("packing_parity.py", 2, ckpt, tmp_path / "r.json")
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["loss_diff"] < 1e-5 * out["loss"] and out["grad_diff"] < 1e-5, out
