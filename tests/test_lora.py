"""LoRA end to end on CPU processes: SFT with adapters at TP=2 x PP=2, resumed, exported merged
and as a PEFT adapter, each checked against an independent computation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from converters import hf2mcore, mcore2hf
from converters.hf2mcore import HF2McoreConfig
from converters.mcore2hf import LoraExportConfig, McoreToHFConfig
from mtrain.checkpoint import TRACKER
from mtrain.models.tiny import corpus, write_chat_task
from tests.conftest import TINY, tiny_spec
from tests.torchrun import run_many, torchrun

pytestmark = pytest.mark.slow
ITERS = 8
R, ALPHA = 8, 16.0


def load_dir(path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def setup(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    hf = tiny_hf(TINY)
    for tp, pp in ((1, 1), (2, 2)):
        hf2mcore.convert(
            HF2McoreConfig(hf_dir=str(hf), out_dir=str(root / f"c{tp}{pp}"), tp=tp, pp=pp)
        )
    write_chat_task(root / "chat.jsonl")
    return root, hf


def sft_overrides(setup, tp: int, pp: int, save, **extra) -> list[str]:
    root, hf = setup
    args = {
        "+model": "qwen3_tiny",
        "model.hf_dir": hf,
        "load": root / f"c{tp}{pp}",
        "save": save,
        "data.path": root / "chat.jsonl",
        "data.cache_dir": root / "cache",
        "data.packing": "true",
        "finetuning_type": "lora",
        "lora.r": R,
        "lora.alpha": ALPHA,
        "train.iters": ITERS,
        "train.seq_length": 64,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        "train.precision": "fp32",
        "train.lr": 1e-2,
        "parallel.tp": tp,
        "parallel.pp": pp,
        "device": "cpu",
        **extra,
    }
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="module")
def runs(setup):
    """Every LoRA SFT run, in one torchrun of 4 processes: {name: loss curve}. "lora22" (TP=2 x
    PP=2, uninterrupted) is the run the others are held to; "lora11" is TP=1 x PP=1 (at DP=4,
    the same tokens per step); "part1" + "part2" interrupt and resume lora22."""
    root = setup[0]
    resumed = {"save": root / "lora22_resumed"}
    plan = {
        "lora22": sft_overrides(setup, 2, 2, root / "lora22", **{"checkpoint.save_hf": "true"}),
        "lora11": sft_overrides(
            setup, 1, 1, root / "lora11",
            **{"checkpoint.save_hf": "true", "checkpoint.save_hf_lora": "adapter"},
        ),
        "part1": sft_overrides(setup, 2, 2, **resumed, **{"train.exit_after_iters": 3}),
        "part2": sft_overrides(setup, 2, 2, **resumed),
    }  # fmt: skip
    results, _ = run_many(4, {k: ["sft", v] for k, v in plan.items()}, root)
    return {name: [h["loss"] for h in history] for name, history in results.items()}


@pytest.fixture(scope="module")
def reference(setup, runs):
    return runs["lora22"], setup[0] / "lora22"


def test_lora_trains_and_saves_only_the_adapters(reference, setup):
    losses, save = reference
    assert len(losses) == ITERS and losses[-1] < losses[0] - 0.5, losses
    state = torch.load(
        save / "iter_0000008" / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=False
    )
    assert state["model"] and all(".lora_" in k for k in state["model"]), list(state["model"])
    assert state["args"].lora_base_checkpoint == str((setup[0] / "c22").resolve())


def test_tp2pp2_and_tp1pp1_lora_give_the_same_loss_curve(setup, runs, reference):
    """The adapters' init does not depend on the layout, and the TP communication of their
    gradients (A's all-reduce on column-parallel bases) is exact."""
    save, single = setup[0] / "lora11", runs["lora11"]
    diffs = [abs(a - b) for a, b in zip(reference[0], single)]
    assert len(diffs) == ITERS and max(diffs) < 1e-4, diffs

    # checkpoint.save_hf_lora=adapter wrote the PEFT adapter mcore2hf writes from that checkpoint.
    peft = setup[0] / "lora11_peft"
    mcore2hf.convert(
        McoreToHFConfig(
            ckpt_dir=str(save), out_dir=str(peft), hf_dir=str(setup[1]),
            lora=LoraExportConfig(merge=False),
        )
    )  # fmt: skip
    exported = save / "iter_0000008" / "hf"
    assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in peft.iterdir())
    ours, theirs = load_dir(exported), load_dir(peft)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_interrupted_and_resumed_lora_reproduces_the_loss_sequence(runs, reference):
    assert len(runs["part1"]) == 3 and runs["part1"] + runs["part2"] == reference[0]


def test_merged_and_peft_exports_reproduce_the_lora_models_logits(setup, reference, tmp_path):
    root, hf = setup
    ckpt = reference[1]
    merged, peft = tmp_path / "merged", tmp_path / "peft"
    mcore2hf.convert(McoreToHFConfig(ckpt_dir=str(ckpt), out_dir=str(merged), hf_dir=str(hf)))
    mcore2hf.convert(
        McoreToHFConfig(
            ckpt_dir=str(ckpt),
            out_dir=str(peft),
            hf_dir=str(hf),
            lora=LoraExportConfig(merge=False),
        )
    )
    result = tmp_path / "result.json"
    torchrun("lora_parity.py", 4, result, ckpt, hf, merged, peft)
    diffs = json.loads(result.read_text())
    # checkpoint.save_hf wrote, at the end of training, what mcore2hf writes afterwards.
    exported = ckpt / "iter_0000008" / "hf"
    assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in merged.iterdir())
    ours, theirs = load_dir(exported), load_dir(merged)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert diffs["merged"] < 1e-5 and diffs["peft"] < 1e-5, diffs
    assert diffs["disabled_vs_base"] < 1e-5, diffs  # adapters off: the base model (DPO's reference)
    assert diffs["adapter_effect"] > 1e-2, diffs  # the adapters are not a no-op

    # The merged weights are W + (alpha / r) B A, from the PEFT tensors, in plain torch.
    base, out = load_dir(hf), load_dir(merged)
    adapter = load_file(peft / "adapter_model.safetensors")
    config = json.loads((peft / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (R, ALPHA, "LORA")
    modules = [f"self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    modules += [f"mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    for layer in range(TINY.num_layers):
        for module in modules:
            name = f"model.layers.{layer}.{module}"
            a = adapter[f"base_model.model.{name}.lora_A.weight"]
            b = adapter[f"base_model.model.{name}.lora_B.weight"]
            expected = base[f"{name}.weight"] + (ALPHA / R) * b @ a
            torch.testing.assert_close(out[f"{name}.weight"], expected, atol=1e-6, rtol=1e-6)
    untouched = [k for k in base if not any(f".{m}." in k for m in modules)]
    assert untouched and all(torch.equal(base[k], out[k]) for k in untouched)


def test_adapter_checkpoint_is_20x_smaller_than_a_full_one(tiny_hf, tmp_path):
    """Weights and optimizer state, LoRA r=8 vs full fine-tuning, for a tiny model whose hidden
    size (256) is large against r (with hidden 64 = 8 r the ratio would be about 7)."""
    spec = tiny_spec(num_layers=2, hidden_size=256, ffn_hidden_size=512, kv_channels=64)
    hf = tiny_hf(spec)
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(tmp_path / "c")))
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for line in corpus(200, seed=1):
            f.write(json.dumps({"text": line}) + "\n")
    common = {
        "+model": "qwen3_tiny",
        "model.num_layers": 2,
        "model.hidden_size": 256,
        "model.ffn_hidden_size": 512,
        "model.kv_channels": 64,
        "parallel.tp": 1,
        "parallel.pp": 1,
        "model.hf_dir": hf,
        "load": tmp_path / "c",
        "lora.r": R,
        "data.path": tmp_path / "corpus.jsonl",
        "data.cache_dir": tmp_path / "cache",
        "train.iters": 1,
        "train.seq_length": 32,
        "train.global_batch_size": 2,
        "train.precision": "fp32",
        "device": "cpu",
    }
    kinds = ("full", "lora")
    plan = {
        kind: ["pt", [f"{k}={v}" for k, v in {**common, "save": tmp_path / kind,
                                               "finetuning_type": kind}.items()]]
        for kind in kinds
    }  # fmt: skip
    run_many(1, plan, tmp_path)
    sizes = {}
    for kind in kinds:
        assert (tmp_path / kind / TRACKER).read_text().strip() == "1"
        sizes[kind] = sum(p.stat().st_size for p in (tmp_path / kind).rglob("*") if p.is_file())
    print(f"full {sizes['full']} B, lora {sizes['lora']} B: {sizes['full'] / sizes['lora']:.1f}x")
    assert sizes["full"] / sizes["lora"] >= 20, sizes


def test_adapter_forward_and_gradients_at_tp2_with_and_without_sequence_parallelism(tmp_path):
    """Megatron's column- and row-parallel linears with adapters at TP=2 vs the dense layer:
    output, input gradient and A/B gradients on every rank (fp32; values are O(10-100))."""
    torchrun("lora_linear.py", 2, tmp_path / "result.json")
    ranks = json.loads((tmp_path / "result.json").read_text())
    for rank in ranks:
        assert set(rank) == {"column", "column-sp", "row", "row-sp"}
        for case, diffs in rank.items():
            assert all(diffs[k] < 1e-4 for k in ("out", "x", "a", "b")), (case, diffs)
        # With SP, the replicated matrix sees only this rank's tokens: megatron must all-reduce it.
        assert [r["marked"] for r in rank.values()] == [[], ["a"], [], ["b"]]
