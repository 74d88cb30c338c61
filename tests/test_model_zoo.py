"""conf/model presets against the published HF configs, and the HF config reader's refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtrain.config.model import load_preset as preset
from mtrain.errors import ConfigError
from mtrain.models.spec import hf_config_from_spec, spec_from_hf_config

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"

# Fields of the config.json files published as Qwen/Qwen3-* on the HF hub, and the total and
# non-embedding parameter counts (billions) stated on their model cards.
_COMMON = dict(
    model_type="qwen3",
    head_dim=128,
    num_key_value_heads=8,
    vocab_size=151936,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    attention_bias=False,
    use_sliding_window=False,
)
PUBLISHED = {
    "qwen3_0_6b": (
        dict(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            tie_word_embeddings=True,
        ),
        0.6,
        0.44,
    ),
    "qwen3_1_7b": (
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            tie_word_embeddings=True,
        ),
        1.7,
        1.4,
    ),
    "qwen3_4b": (
        dict(
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            tie_word_embeddings=True,
        ),
        4.0,
        3.6,
    ),
    "qwen3_8b": (
        dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            tie_word_embeddings=False,
        ),
        8.2,
        6.95,
    ),
    "qwen3_14b": (
        dict(
            hidden_size=5120,
            intermediate_size=17408,
            num_hidden_layers=40,
            num_attention_heads=40,
            tie_word_embeddings=False,
        ),
        14.8,
        13.2,
    ),
    "qwen3_32b": (
        dict(
            hidden_size=5120,
            intermediate_size=25600,
            num_hidden_layers=64,
            num_attention_heads=64,
            tie_word_embeddings=False,
        ),
        32.8,
        31.2,
    ),
}


def test_every_preset_file_is_checked():
    moe = ["qwen3_30b_a3b", "qwen3_235b_a22b", "qwen3_moe_tiny"]  # checked in tests/test_moe.py
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted([*PUBLISHED, "qwen3_tiny", *moe])


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_equals_the_published_hf_config(name):
    fields, total_b, non_embedding_b = PUBLISHED[name]
    cfg = preset(name)
    spec = cfg.spec()
    assert spec == spec_from_hf_config({**_COMMON, **fields}, name)
    total = spec.num_parameters()
    embedding = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
    assert round(total / 1e9, 1) == pytest.approx(total_b, abs=0.051)
    assert (total - embedding) / 1e9 == pytest.approx(non_embedding_b, abs=0.051)
    spec.check_parallel(cfg.recommended_tp, cfg.recommended_pp)


def test_tiny_preset_is_cpu_sized_and_has_qwen3s_unusual_head_dim():
    spec = preset("qwen3_tiny").spec()
    assert spec.num_parameters() < 1_000_000
    assert spec.kv_channels != spec.hidden_size // spec.num_attention_heads


def test_spec_survives_hf_config_json_both_ways():
    spec = preset("qwen3_32b").spec()
    assert spec_from_hf_config(hf_config_from_spec(spec)) == spec


def test_preset_checked_against_hf_dir(tiny_hf):
    cfg = preset("qwen3_tiny")
    cfg.hf_dir = str(tiny_hf())
    assert cfg.spec().hidden_size == 64
    cfg.name, cfg.num_layers = "wrong", 8
    with pytest.raises(ConfigError, match=r"model.num_layers=8 \(preset wrong\) but .* has 4"):
        cfg.spec()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="mistral"), "model_type='mistral' is not supported"),
        (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
        (dict(use_sliding_window=True), "use_sliding_window=true is not supported"),
        (dict(attention_bias=True), "attention_bias=True is not supported for model_type='qwen3'"),
        (
            dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
            "rope scaling .* is not supported",
        ),
        (dict(hidden_size=None), "required field 'hidden_size' is missing"),
    ],
)
def test_unsupported_hf_options_are_refused_by_name(change, message):
    fields, _, _ = PUBLISHED["qwen3_0_6b"]
    with pytest.raises(ConfigError, match=message):
        spec_from_hf_config({**_COMMON, **fields, **change}, "config.json")


def test_llama31_rope_scaling_is_read():
    cfg = dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rope_theta=500000.0,
    )
    spec = spec_from_hf_config(cfg)
    assert spec.rope_scaling_factor == 8.0 and spec.kv_channels == 128
    assert spec_from_hf_config(hf_config_from_spec(spec)) == spec
