"""Qwen3-MoE: presets against the published configs, conversion with expert parallelism (both
expert layouts, both HF expert layouts) bit-exact both ways, and logits equal to HF's."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters import hf2mcore, mcore2hf
from converters.hf2mcore import HF2McoreConfig
from converters.mcore2hf import McoreToHFConfig
from mtrain.config.model import load_preset
from mtrain.errors import ConfigError
from mtrain.models.spec import hf_config_from_spec, spec_from_hf_config
from tests.torchrun import torchrun

# Fields of the config.json files published as Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B, and
# the total / activated / non-embedding parameter counts (billions) on their model cards.
_COMMON = dict(
    model_type="qwen3_moe", head_dim=128, num_key_value_heads=4, vocab_size=151936,
    max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
    attention_bias=False, use_sliding_window=False, tie_word_embeddings=False, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    router_aux_loss_coef=0.001, output_router_logits=False,
)  # fmt: skip
PUBLISHED = {
    "qwen3_30b_a3b": (
        dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
             num_hidden_layers=48, num_attention_heads=32),
        30.5, 3.3, 29.9,
    ),
    "qwen3_235b_a22b": (
        dict(hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
             num_hidden_layers=94, num_attention_heads=64),
        235, 22, 234,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_equals_the_published_hf_config(name):
    fields, total_b, active_b, non_embedding_b = PUBLISHED[name]
    cfg = load_preset(name)
    spec = cfg.spec()
    assert spec == spec_from_hf_config({**_COMMON, **fields}, name)
    assert spec_from_hf_config(hf_config_from_spec(spec)) == spec
    embedding = 2 * spec.vocab_size * spec.hidden_size
    assert spec.num_parameters() / 1e9 == pytest.approx(total_b, rel=0.005)
    assert spec.num_parameters(active=True) / 1e9 == pytest.approx(active_b, rel=0.02)
    assert (spec.num_parameters() - embedding) / 1e9 == pytest.approx(non_embedding_b, rel=0.005)
    spec.check_parallel(cfg.recommended_tp, cfg.recommended_pp)
    spec.check_experts(cfg.recommended_ep, cfg.recommended_tp)


def test_dense_layers_follow_hfs_sparse_step_and_mlp_only_layers():
    fields = PUBLISHED["qwen3_30b_a3b"][0]
    cfg = {**_COMMON, **fields, "num_hidden_layers": 6, "decoder_sparse_step": 2}
    spec = spec_from_hf_config({**cfg, "mlp_only_layers": [3]})
    # HF: layer i is sparse when (i + 1) % step == 0 and i is not in mlp_only_layers
    assert spec.moe_layer_pattern() == [0, 1, 0, 0, 0, 1]
    with pytest.raises(ConfigError, match="ep=3 must divide num_experts=128"):
        spec.check_experts(3, 1)


def _load(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in hf_dir.glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def moe_hf(tiny_hf):
    return tiny_hf(load_preset("qwen3_moe_tiny").spec())


def test_save_pretrained_writes_one_tensor_per_expert(moe_hf):
    names = set(_load(moe_hf))
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.0.mlp.gate.weight" in names
    assert "model.layers.1.mlp.gate_proj.weight" in names  # the dense layer
    assert not any("gate_up_proj" in n for n in names)


LAYOUTS = [(tp, pp, ep) for tp in (1, 2) for pp in (1, 2) for ep in (1, 2)]


@pytest.mark.parametrize("tp, pp, ep", LAYOUTS, ids=[f"tp{t}-pp{p}-ep{e}" for t, p, e in LAYOUTS])
@pytest.mark.parametrize("experts", ["sequential", "grouped"])
def test_roundtrip_is_bit_exact(moe_hf, tmp_path, tp, pp, ep, experts):
    ckpt = tmp_path / "ckpt"
    hf2mcore.convert(
        HF2McoreConfig(
            hf_dir=str(moe_hf), out_dir=str(ckpt), tp=tp, pp=pp, ep=ep, expert_layout=experts
        )
    )
    rank = "mp_rank_01" if tp == 2 else "mp_rank_00"
    rank += "_001" if pp == 2 else ""
    rank += "_001" if ep == 2 else ""  # Megatron-LM's names: ..._{pp:03d}_{ep:03d}
    state = torch.load(ckpt / "release" / rank / "model_optim_rng.pt", weights_only=False)
    assert state["args"].expert_model_parallel_size == ep
    assert state["args"].moe_grouped_gemm == (experts == "grouped")
    names = state["model"]
    if experts == "grouped":
        # GroupedMLP: weight1 [H, E_local * 2F/TP], weight2 [E_local * F/TP, H]
        assert names["decoder.layers.0.mlp.experts.weight1"].shape == (64, 8 // ep * 64 // tp)
        assert names["decoder.layers.0.mlp.experts.weight2"].shape == (8 // ep * 32 // tp, 64)
    else:
        fc1 = f"decoder.layers.0.mlp.experts.local_experts.{8 // ep - 1}.linear_fc1.weight"
        assert names[fc1].shape == (64 // tp, 64)
    back = tmp_path / "back"
    mcore2hf.convert(McoreToHFConfig(ckpt_dir=str(ckpt), out_dir=str(back)))
    want, got = _load(moe_hf), _load(back)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_experts_stacked_in_3d_tensors_are_read(moe_hf, tmp_path):
    """transformers 5 holds a layer's experts as gate_up_proj [E, 2F, H] / down_proj [E, H, F];
    a checkpoint saved from that state dict converts like the per-expert one."""
    spec = load_preset("qwen3_moe_tiny").spec()
    tensors = _load(moe_hf)
    stacked_dir = tmp_path / "stacked"
    stacked_dir.mkdir()
    for layer in range(spec.num_layers):
        if not spec.is_moe_layer(layer):
            continue
        prefix = f"model.layers.{layer}.mlp.experts."
        pop = [
            {
                n: tensors.pop(f"{prefix}{e}.{n}.weight")
                for n in ("gate_proj", "up_proj", "down_proj")
            }
            for e in range(spec.num_experts)
        ]
        tensors[prefix + "gate_up_proj"] = torch.stack(
            [torch.cat([p["gate_proj"], p["up_proj"]]) for p in pop]
        )
        tensors[prefix + "down_proj"] = torch.stack([p["down_proj"] for p in pop])
    save_file(tensors, stacked_dir / "model.safetensors")
    (stacked_dir / "config.json").write_text((moe_hf / "config.json").read_text())
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(stacked_dir), out_dir=str(ckpt), tp=2, ep=2))
    mcore2hf.convert(McoreToHFConfig(ckpt_dir=str(ckpt), out_dir=str(back)))
    want, got = _load(moe_hf), _load(back)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_logits_match_hf_at_tp2_ep2_ep2_pp2_and_tp1_ep1(moe_hf, tmp_path):
    layouts = {
        "tp1ep1": dict(tp=1, pp=1, ep=1),
        "tp2ep2": dict(tp=2, pp=1, ep=2),
        "ep2pp2_grouped": dict(tp=1, pp=2, ep=2, expert_layout="grouped"),
    }
    ckpts = {}
    for name, layout in layouts.items():
        ckpts[name] = tmp_path / name
        hf2mcore.convert(HF2McoreConfig(hf_dir=str(moe_hf), out_dir=str(ckpts[name]), **layout))
    torchrun("parity.py", 4, tmp_path / "result.json", moe_hf, *ckpts.values())
    raw = json.loads((tmp_path / "result.json").read_text())
    diffs = {name: raw[str(path)] for name, path in ckpts.items()}
    assert all(d < 1e-5 for d in diffs.values()), diffs


def test_dry_run_counts_total_and_active_parameters_and_experts_per_ep_rank(monkeypatch):
    from hydra import compose, initialize_config_dir

    import mtrain.sft  # noqa: F401 (registers the sft schema)
    from mtrain.cli import to_schema
    from mtrain.config import CONF_DIR
    from mtrain.config.schema import validate
    from mtrain.dry_run import describe_plan
    from mtrain.estimates import memory_estimate

    monkeypatch.setenv("WORLD_SIZE", "16")  # 2 x 8 devices: the preset's PP2 EP8
    overrides = ["+model=qwen3_30b_a3b", "data.path=x.jsonl", "train.iters=10",
                 "train.seq_length=4096", "train.global_batch_size=64", "train.recompute=full",
                 "parallel.distributed_optimizer=true"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_schema(compose("sft", overrides))
    text = describe_plan(cfg)
    assert "30.53 B parameters (3.35 B active per token)" in text
    assert "16 per EP rank (ep 8, etp 1)" in text and "tp 1 x pp 2 x dp 8, ep 8" in text
    mem = memory_estimate(cfg, validate(cfg, 16))
    # 24 layers per stage x 16 experts x (gate, up, down) 3 x 2048 x 768
    assert mem["experts"] == 24 * 16 * 3 * 2048 * 768
    assert 40 < sum(mem[k] for k in ("weights", "gradients", "optimizer", "activations")) < 80


def test_megatron_config_routes_like_hf_and_keeps_dense_layers():
    from mtrain.config.moe import MoeConfig
    from mtrain.models.moe import moe_transformer_fields

    spec = load_preset("qwen3_moe_tiny").spec()
    fields = moe_transformer_fields(spec, 2, None, 2, MoeConfig(capacity_factor=1.5))
    assert fields["moe_layer_freq"] == [1, 0, 1, 1]  # layer 1 is dense (mlp_only_layers)
    assert fields["moe_router_pre_softmax"] is False  # softmax over the top-k = renormalised
    assert fields["moe_token_dispatcher_type"] == "alltoall"
    assert fields["moe_expert_capacity_factor"] == 1.5
    assert fields["expert_tensor_parallel_size"] == 2  # megatron-core 0.12's default: tp
    assert fields["moe_router_load_balancing_type"] == "none"  # aux loss off by default
    unnormalised = replace(spec, moe_norm_topk_prob=False)
    assert moe_transformer_fields(unnormalised, 1, None, 1, MoeConfig())["moe_router_pre_softmax"]
