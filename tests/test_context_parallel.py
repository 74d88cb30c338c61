"""Context parallelism (`parallel.cp`): CP ranks together compute what one rank computes on the
whole sequence, checked against the HF model, through the trainer's own pieces, on CPU in fp32.

Two torchrun launches of 4 processes: tests/dist/cp_parity.py (loss and every parameter's
gradient at several layouts and kernels, for pretraining rows, packed SFT rows and DPO pairs)
and tests/dist/cp_resume.py (loss curves: CP2, CP2 interrupted and resumed, CP1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from converters import hf2mcore
from converters.hf2mcore import HF2McoreConfig
from mtrain.config.schema import validate
from mtrain.context_parallel import chunk_order, rank_chunks, shard_batch
from mtrain.errors import ConfigError
from mtrain.kernels import mindspeed
from mtrain.models.tiny import corpus
from tests.conftest import tiny_spec
from tests.test_npu_flags import config as npu_config
from tests.torchrun import torchrun

EMULATION = Path(__file__).parent / "npu_emulation"
TOLERANCE = 1e-5  # fp32, relative to max(1, the reference's magnitude)
# The first case is the CP1 reference; tp2-cp2 repeats the tiny model's one kv head per TP rank.
CASES = [
    "tp1-pp1-cp1-local",
    "tp2-pp1-cp2-local",
    "tp1-pp2-cp2-local",
    "tp1-pp1-cp4-local",
    "tp1-pp1-cp2-sdpa",
    "tp1-pp1-cp2-torch_npu",
    "tp2-pp1-cp2-local-full",
    "tp1-pp1-cp2-sdpa-selective",
    "tp2-pp1-cp2-torch_npu-sp",
]


@pytest.fixture(scope="module")
def setup(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    hf = tiny_hf(tiny_spec(tie_word_embeddings=False))
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        out = root / f"tp{tp}-pp{pp}"
        hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(out), tp=tp, pp=pp))
    with open(root / "corpus.jsonl", "w") as f:
        for line in corpus(2000, seed=1):
            f.write(json.dumps({"text": line}) + "\n")
    return root, hf


@pytest.mark.slow
def test_cp_loss_and_every_gradient_equal_cp1_and_the_hf_model(setup):
    """TP2 x CP2, CP2 x PP2 and CP4 with the local spec; CP2 with sdpa and torch_npu (emulated,
    fused RoPE and varlen packed attention); full and selective recompute under CP; sequence
    parallelism with CP (torch_npu);
    pretraining, packed SFT and DPO; validation's forward-only loss for the first two."""
    root, hf = setup
    path = os.pathsep.join([str(EMULATION), os.environ.get("PYTHONPATH", "")])
    result = root / "parity.json"
    torchrun("cp_parity.py", 4, result, hf, root, *CASES, env={"PYTHONPATH": path})
    results = json.loads(result.read_text())
    assert list(results) == CASES
    for case, tasks in results.items():
        assert set(tasks) == {"pt", "packed", "dpo"}
        for task, r in tasks.items():
            scale = max(1.0, abs(r["hf_loss"]))
            assert abs(r["loss"] - r["hf_loss"]) <= TOLERANCE * scale, (case, task, r)
            assert abs(r["eval_loss"] - r["hf_loss"]) <= TOLERANCE * scale, (case, task, r)
            assert r["loss_vs_first"] <= TOLERANCE * scale, (case, task, r)
            assert r["grad_diff"] <= TOLERANCE * max(1.0, r["grad_scale"]), (case, task, r)
            assert r["grad_vs_first"] <= TOLERANCE * max(1.0, r["grad_scale"]), (case, task, r)


@pytest.mark.slow
def test_cp2_training_resumes_exactly_and_follows_cp1(setup):
    root, hf = setup
    result = root / "resume.json"
    torchrun("cp_resume.py", 4, result, hf, root / "tp2-pp1", root / "corpus.jsonl", root, "2")
    curves = json.loads(result.read_text())
    assert len(curves["cp2"]) == 4 and curves["cp2"][-1] < curves["cp2"][0]
    assert curves["part1"] + curves["part2"] == curves["cp2"]  # exactly
    assert max(abs(a - b) for a, b in zip(curves["cp2"], curves["cp1"])) < TOLERANCE


def test_each_cp_rank_holds_chunks_r_and_2cp_minus_1_minus_r():
    x = torch.arange(16)
    assert chunk_order(2) == [0, 3, 1, 2]
    assert rank_chunks(x, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert rank_chunks(x, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert rank_chunks(x, 2, 1, "contiguous").tolist() == list(range(8, 16))
    batch = {"tokens": x[None], "attention_mask": torch.ones(1, 1, 16, 16), "ref_logps": x[:2]}
    mine = shard_batch(batch, 2, 1)
    assert mine["tokens"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert mine["attention_mask"] is batch["attention_mask"]
    assert mine["ref_logps"] is batch["ref_logps"]


def cp_config(kernels: str = "local", **changes):
    cfg = npu_config(**changes)  # Qwen3-32B: 64 query heads, 8 kv heads
    cfg.kernels = kernels
    return cfg


@pytest.mark.parametrize(
    "changes, world, message",
    [
        (dict(parallel__cp=2, train__seq_length=4098), 32, "train.seq_length=4098 must be a "
         "multiple of 2 x parallel.cp=2 = 4"),
        (dict(parallel__cp=2, parallel__sequence_parallel=True, train__seq_length=4100), 32,
         "multiple of 2 x parallel.cp=2 x parallel.tp=8 = 32"),
        (dict(parallel__cp=3, train__seq_length=4098), 48, "kv heads per TP rank, "
         "num_query_groups=8 / parallel.tp=8 = 1, to be a multiple or a divisor of cp"),
        (dict(parallel__cp=3), 40, "parallel.tp=8 x parallel.pp=2 x parallel.cp=3 = 48 does "
         "not divide the 40 processes"),
        (dict(parallel__cp=2, parallel__cp_algo="hybrid_cp_algo"), 32, "hybrid_cp_algo is not "
         "supported"),
        (dict(parallel__cp=2, parallel__cp_algo="megatron_cp_algo"), 32, "needs kernels="
         "mindspeed (kernels=local)"),
    ],
)  # fmt: skip
def test_layouts_that_cannot_run_are_refused_naming_the_numbers(changes, world, message):
    cfg = cp_config(**changes)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg, world_size=world)


def test_ulysses_accepts_qwen3_32b_at_tp8_cp8_and_reports_cp_in_the_plan():
    cfg = cp_config(parallel__cp=8, train__seq_length=131072, model__max_position_embeddings=131072)
    plan = validate(cfg, world_size=128)
    assert plan.cp == 8 and plan.dp == 1
    assert plan.describe().startswith("128 devices = tp 8 x pp 2 x cp 8 x dp 1")


@pytest.mark.parametrize("algo", ["ulysses_cp_algo", "megatron_cp_algo"])
def test_mindspeed_cp_gets_its_own_flags_and_typed_training_arguments(algo):
    cfg = cp_config(parallel__cp=2, parallel__cp_algo=algo, kernels="mindspeed")
    plan = validate(cfg, world_size=32)
    mindspeed.check(cfg, plan, "mindspeed")
    argv = mindspeed.flags(cfg, plan, cfg.model.num_layers, packed=False)
    start = argv.index("--context-parallel-size")
    assert argv[start : start + 4] == [
        "--context-parallel-size",
        "2",
        "--context-parallel-algo",
        algo,
    ]
    assert {"--context-parallel-size", "--context-parallel-algo"} <= mindspeed.OWNED
    # What MindSpeed's CP code reads from Megatron-LM's arguments, as Megatron-LM types them.
    typed = mindspeed.training_args(cfg, plan, cfg.model.spec())
    assert typed["context_parallel_size"] == 2 and typed["tensor_model_parallel_size"] == plan.tp
    assert typed["seq_length"] == cfg.train.seq_length and typed["use_legacy_models"] is False
    assert typed["reset_position_ids"] is False and typed["reset_attention_mask"] is False
    cfg.data.packing = True  # type: ignore[attr-defined]
    with pytest.raises(
        ConfigError, match="kernels=mindspeed with parallel.cp > 1 and data.packing"
    ):
        mindspeed.check(cfg, plan, "mindspeed")


def long_context(seq: int, cp: int, recompute=None):
    cfg = cp_config(
        kernels="auto",
        parallel__tp=8,
        parallel__pp=1,
        parallel__cp=cp,
        parallel__distributed_optimizer=True,
        train__seq_length=seq,
        train__global_batch_size=1,
        train__recompute=recompute,
        model__max_position_embeddings=262144,
    )
    cfg.device = "npu"
    return cfg


def test_dry_run_estimates_qwen3_32b_at_tp8_cp8_and_flags_256k_without_full_recompute(
    monkeypatch,
):
    from mtrain.dry_run import describe_plan
    from mtrain.estimates import memory_estimate

    monkeypatch.setenv("WORLD_SIZE", "64")
    acts = {}
    for seq in (32768, 131072, 262144):
        cfg = long_context(seq, 8)
        acts[seq] = memory_estimate(cfg, validate(cfg, 64))["activations"]
    assert acts[131072] == pytest.approx(4 * acts[32768])  # linear in s with flash attention
    cfg = long_context(262144, 1)
    assert memory_estimate(cfg, validate(cfg, 8))["activations"] == pytest.approx(8 * acts[262144])
    # The distributed optimizer shards over DP x CP: 64 ranks at dp 1, not one.
    cfg = long_context(131072, 8)
    plain = memory_estimate(cfg, validate(cfg, 64))
    cfg.parallel.distributed_optimizer = False
    assert memory_estimate(cfg, validate(cfg, 64))["optimizer"] == pytest.approx(
        8 * plain["optimizer"]
    )

    assert describe_plan(long_context(131072, 8)).splitlines()[-1].startswith("fit        yes")
    refused = describe_plan(long_context(262144, 8)).splitlines()[-1]
    assert refused.startswith("fit        NO") and "train.recompute=full" in refused, refused
    full = describe_plan(long_context(262144, 8, "full")).splitlines()[-1]
    assert full.startswith("fit        yes"), full


def test_the_readme_128k_example_fits_2x8_npus(monkeypatch):
    """Qwen3-8B, 128K packed SFT, TP4 x CP4 with full recompute on 16 NPUs."""
    from mtrain.config.model import load_preset
    from mtrain.dry_run import describe_plan
    from mtrain.sft import SFTConfig

    cfg = SFTConfig(model=load_preset("qwen3_8b"), kernels="torch_npu", device="npu")
    cfg.model.max_position_embeddings = 131072
    cfg.train.epochs, cfg.train.seq_length, cfg.train.global_batch_size = 1, 131072, 16
    cfg.train.recompute, cfg.data.path, cfg.data.packing = "full", "long_chat.jsonl", True
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp = 4, 1, 4
    cfg.parallel.sequence_parallel = cfg.parallel.distributed_optimizer = True
    monkeypatch.setenv("WORLD_SIZE", "16")
    fit = describe_plan(cfg).splitlines()[-1]
    assert fit.startswith("fit        yes: 28.") and "of 64.0 GiB" in fit, fit
