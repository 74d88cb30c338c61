"""Training config validation (before any process group) and the dry-run plan."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtrain.config.model import load_preset
from mtrain.config.schema import TrainingCommandConfig, iters_for_epochs, validate
from mtrain.errors import ConfigError
from mtrain.estimates import memory_estimate


def config(preset="qwen3_tiny", **changes) -> TrainingCommandConfig:
    cfg = TrainingCommandConfig(model=load_preset(preset))
    cfg.train.iters, cfg.train.seq_length = 10, 128
    cfg.data.path = "corpus.jsonl"
    for key, value in changes.items():
        group, name = key.split("__") if "__" in key else (None, key)
        setattr(getattr(cfg, group) if group else cfg, name, value)
    return cfg


def test_layout_defaults_to_the_presets_recommendation():
    plan = validate(config("qwen3_32b"), world_size=32)
    assert (plan.tp, plan.pp, plan.dp) == (8, 2, 2)
    assert plan.micro_batches == 8 // (1 * 2)


@pytest.mark.parametrize(
    "changes, world, message",
    [
        (dict(parallel__tp=3), 6, r"parallel: tp=3 must divide num_query_groups=2"),
        (
            dict(parallel__pp=3),
            3,
            r"parallel: pp=3 must divide num_layers=4; try pp in \[1, 2, 4\]",
        ),
        (dict(parallel__tp=2, parallel__pp=2), 6, r"= 4 does not divide the 6 processes"),
        (
            dict(train__global_batch_size=6, parallel__tp=1, parallel__pp=1),
            4,
            r"train.global_batch_size=6 must be a multiple of train.micro_batch_size=1 x "
            r"data-parallel size 4",
        ),
        (dict(parallel__vpp=2, parallel__pp=1), 2, r"parallel.vpp=2 needs parallel.pp > 1"),
        (dict(parallel__sequence_parallel=True, parallel__tp=1), 4, r"needs parallel.tp > 1"),
        (dict(train__seq_length=4096), 4, r"train.seq_length=4096 exceeds .*=512"),
        (dict(train__precision="fp8"), 4, r"train.precision=fp8 is not one of"),
        (dict(train__decay_style="wsd"), 4, r"train.decay_style=wsd is not one of"),
        (dict(train__min_lr=1.0), 4, r"train.min_lr=1.0 exceeds train.lr"),
        (dict(load=None, checkpoint__finetune=True), 4, r"checkpoint.finetune=true needs load="),
        (dict(checkpoint__save_interval=5), 4, r"checkpoint.save_interval is set but save is not"),
        (dict(finetuning_type="lora"), 4, r"finetuning_type=lora needs load=CKPT_DIR"),
        (dict(checkpoint__format="torch"), 4, r"checkpoint.format=torch is not one of legacy, "),
        (dict(checkpoint__save_hf=True), 4, r"checkpoint.save_hf=true needs save=DIR"),
        (dict(checkpoint__save_hf_lora="peft"), 4, r"save_hf_lora=peft is not one of merged"),
        (dict(checkpoint__save_hf_dtype="int8"), 4, r"checkpoint.save_hf_dtype=int8 is not"),
        (dict(checkpoint__save_hf_every_save=True), 4, r"needs checkpoint.save_hf=true"),
        (
            dict(finetuning_type="lora", load="base", checkpoint__format="torch_dist"),
            4,
            r"checkpoint.format=torch_dist is for full and freeze runs",
        ),
        (
            dict(finetuning_type="qlora"),
            4,
            r"finetuning_type=qlora is not one of full, freeze, lora",
        ),
    ],
)
def test_invalid_combinations_name_their_keys(changes, world, message):
    with pytest.raises(ConfigError, match=message):
        validate(config(**changes), world_size=world)


def test_memory_estimate_shrinks_with_the_distributed_optimizer():
    cfg = config("qwen3_32b", train__seq_length=4096)
    plain = memory_estimate(cfg, validate(cfg, 32))
    cfg.parallel.distributed_optimizer = True
    sharded = memory_estimate(cfg, validate(cfg, 32))
    assert sharded["optimizer"] == pytest.approx(plain["optimizer"] / 2)
    # 32.8 B parameters over tp 8 x pp 2: the busiest stage holds ~2.1 B
    assert 1.9e9 < plain["parameters"] < 2.3e9


def test_lora_memory_estimate_counts_gradients_and_adam_for_the_adapters_only():
    cfg = config("qwen3_32b", train__seq_length=4096, parallel__tp=4, parallel__pp=1)
    full = memory_estimate(cfg, validate(cfg, 8))
    cfg.finetuning_type, cfg.load = "lora", "base"
    lora = memory_estimate(cfg, validate(cfg, 8))
    # r=8 on qkv, proj, fc1, fc2 of Qwen3-32B's 64 layers at TP=4: 8 * 64 * (
    #   (5120 + 10240 / 4) + (8192 / 4 + 5120) + (5120 + 51200 / 4) + (25600 / 4 + 5120)) adapters
    assert lora["trained"] == 8 * 64 * (7680 + 7168 + 17920 + 11520)
    assert lora["optimizer"] == pytest.approx(
        full["optimizer"] * lora["trained"] / full["parameters"]
    )
    assert lora["weights"] > full["weights"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtrain.pt", *args], capture_output=True, text=True, timeout=120
    )


def test_dry_run_of_qwen3_32b_prints_the_plan_without_building_anything():
    proc = run(
        "+model=qwen3_32b",
        "dry_run=true",
        "train.iters=100",
        "train.seq_length=4096",
        "train.global_batch_size=64",
        "data.path=corpus.jsonl",
    )
    assert proc.returncode == 0, proc.stderr
    assert "16 devices = tp 8 x pp 2 x dp 1" in proc.stdout
    assert "32.76 B parameters" in proc.stdout and "GiB" in proc.stdout


def test_bad_training_config_is_one_line_and_exit_code_2():
    proc = run(
        "+model=qwen3_32b",
        "dry_run=true",
        "train.iters=100",
        "parallel.tp=3",
        "data.path=corpus.jsonl",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: parallel: tp=3 must divide num_query_groups=8 and "
        "num_attention_heads=64; try tp in [1, 2, 4, 8]"
    )


def test_missing_model_preset_is_explained():
    proc = run("dry_run=true", "train.iters=1", "data.path=x")
    assert proc.returncode == 2 and "model" in proc.stderr and "+model=" in proc.stderr


@pytest.mark.parametrize("iters, epochs", [(None, None), (10, 1.0)])
def test_exactly_one_of_iters_and_epochs(iters, epochs):
    with pytest.raises(ConfigError, match="exactly one of train.iters and train.epochs"):
        validate(config(train__iters=iters, train__epochs=epochs), world_size=4)


def test_epochs_become_whole_global_batches():
    cfg = config(train__iters=None, train__epochs=2.5, train__global_batch_size=8)
    validate(cfg, world_size=4)
    assert iters_for_epochs(cfg.train, samples_per_epoch=100) == 31  # floor(250 / 8)
    with pytest.raises(ConfigError, match="holds 5 samples .* fewer than one global batch"):
        iters_for_epochs(cfg.train, samples_per_epoch=5)


def test_dpo_memory_estimate_counts_pairs_and_a_reference_copy():
    from mtrain.config.model import load_preset as preset
    from mtrain.dpo import DPOConfig

    def estimate(reference: str) -> dict:
        cfg = DPOConfig(model=preset("qwen3_8b"))
        cfg.train.iters, cfg.train.seq_length, cfg.load = 10, 1024, "base"
        cfg.data.path, cfg.dpo.reference = "pairs.jsonl", reference
        return memory_estimate(cfg, validate(cfg, 8))

    sft = config("qwen3_8b", train__seq_length=1024)
    single = memory_estimate(sft, validate(sft, 8))
    pre, copy = estimate("precompute"), estimate("model")
    assert pre["activations"] > single["activations"]  # two sequences per pair
    assert copy["weights"] == pytest.approx(2 * pre["weights"])
    assert copy["optimizer"] == pre["optimizer"]


def test_stages_that_tokenize_refuse_a_missing_hf_dir_by_key():
    model = load_preset("qwen3_tiny")
    with pytest.raises(ConfigError, match=r"^model.hf_dir is required: SFT tokenizes \(pass"):
        model.tokenizer_dir("SFT tokenizes")
    model.hf_dir = "/models/x"
    assert model.tokenizer_dir("SFT tokenizes") == "/models/x"
