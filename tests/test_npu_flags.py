"""NPU start-up on CPU: the MindSpeed flag table, refused combinations, kernel choice, and the
import order (fake torch_npu / MindSpeed modules in a subprocess record what they saw)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtrain import accel
from mtrain import kernels as layers
from mtrain.accel.runtime_env import NPU_DEFAULTS, apply_npu_defaults
from mtrain.config.model import load_preset
from mtrain.config.schema import TrainingCommandConfig, validate
from mtrain.errors import ConfigError
from mtrain.kernels import mindspeed

ROOT = Path(__file__).resolve().parent.parent


def config(**changes) -> TrainingCommandConfig:
    cfg = TrainingCommandConfig(model=load_preset("qwen3_32b"))
    cfg.train.iters, cfg.train.seq_length, cfg.train.global_batch_size = 10, 4096, 16
    cfg.data.path = "corpus.jsonl"
    cfg.parallel.tp, cfg.parallel.pp = 8, 2
    for key, value in changes.items():
        group, name = key.split("__")
        setattr(getattr(cfg, group), name, value)
    return cfg


def flags_of(cfg, packed=False):
    plan = validate(cfg, world_size=16)
    mindspeed.check(cfg, plan, "mindspeed")
    return mindspeed.flags(cfg, plan, cfg.model.num_layers, packed)


def test_defaults_turn_on_the_four_fused_kernels_and_causal_flash_attention():
    argv = flags_of(config())
    for flag in (
        "--use-flash-attn",
        "--use-fused-rmsnorm",
        "--use-fused-swiglu",
        "--use-fused-rotary-pos-emb",
    ):
        assert flag in argv
    assert argv[argv.index("--sparse-mode") + 1] == "2"
    assert argv[argv.index("--tensor-model-parallel-size") + 1] == "8"
    assert argv[argv.index("--pipeline-model-parallel-size") + 1] == "2"
    assert "--bf16" in argv and "--swiglu" in argv
    for flag in ("--use-ascend-mc2", "--sequence-parallel", "--use-distributed-optimizer"):
        assert flag not in argv


@pytest.mark.parametrize(
    "key, flag",
    [
        ("npu__flash_attn", "--use-flash-attn"),
        ("npu__fused_rmsnorm", "--use-fused-rmsnorm"),
        ("npu__fused_swiglu", "--use-fused-swiglu"),
        ("npu__fused_rope", "--use-fused-rotary-pos-emb"),
    ],
)
def test_each_fused_kernel_switch_maps_to_its_flag(key, flag):
    assert flag in flags_of(config(**{key: True}))
    assert flag not in flags_of(config(**{key: False}))


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(parallel__distributed_optimizer=True), ["--use-distributed-optimizer"]),
        (dict(parallel__sequence_parallel=True), ["--sequence-parallel"]),
        (dict(parallel__overlap_grad_reduce=True), ["--overlap-grad-reduce"]),
        (
            dict(npu__mc2=True, parallel__sequence_parallel=True),
            ["--use-ascend-mc2", "--sequence-parallel"],
        ),
        (
            dict(train__recompute="full"),
            ["--recompute-granularity", "full", "--recompute-method", "uniform"],
        ),
        (dict(train__recompute="selective"), ["--recompute-granularity", "selective"]),
        (dict(train__precision="fp16"), ["--fp16"]),
        (dict(parallel__vpp=2), ["--num-layers-per-virtual-pipeline-stage", "16"]),
        (
            dict(npu__mindspeed_flags=["--use-fused-ring-attention-update"]),
            ["--use-fused-ring-attention-update"],
        ),
    ],
)
def test_options_map_to_mindspeed_flags(changes, expected):
    argv = flags_of(config(**changes))
    start = argv.index(expected[0])
    assert argv[start : start + len(expected)] == expected


def test_every_flag_mtrain_emits_is_one_the_user_may_not_repeat():
    everything = dict(
        parallel__sequence_parallel=True,
        parallel__distributed_optimizer=True,
        parallel__overlap_grad_reduce=True,
        parallel__vpp=2,
        npu__mc2=True,
        train__recompute="full",
    )
    for packed in (False, True):
        emitted = {a for a in flags_of(config(**everything), packed) if a.startswith("--")}
        assert emitted <= mindspeed.OWNED, emitted - mindspeed.OWNED
    assert "--fp16" in flags_of(config(train__precision="fp16"))


def test_fp32_and_no_recompute_add_no_flags():
    argv = flags_of(config(train__precision="fp32"))
    assert not {"--bf16", "--fp16", "--recompute-granularity"} & set(argv)


def test_packed_batches_use_the_given_mask_mode():
    argv = flags_of(config(), packed=True)
    assert argv[argv.index("--sparse-mode") + 1] == "0"
    assert "--sparse-mode" not in flags_of(config(npu__flash_attn=False))


@pytest.mark.parametrize(
    "changes, kernels, message",
    [
        (
            dict(npu__mc2=True),
            "mindspeed",
            r"npu.mc2=true needs parallel.tp > 1 and parallel.sequence_parallel=true",
        ),
        (
            dict(npu__mc2=True, parallel__tp=1, parallel__pp=2),
            "mindspeed",
            r"tp=1",
        ),
        (
            dict(npu__mc2=True, parallel__sequence_parallel=True),
            "torch_npu",
            r"npu.mc2=true needs kernels=mindspeed",
        ),
        (
            dict(npu__mc2=True, parallel__sequence_parallel=True, finetuning_type__lora=None),
            "mindspeed",
            r"finetuning_type=lora",
        ),
        (
            dict(npu__mindspeed_flags=["--foo"]),
            "torch_npu",
            r"npu.mindspeed_flags=\['--foo'\] needs kernels=mindspeed",
        ),
        (dict(npu__mindspeed_flags=["foo"]), "mindspeed", r"'foo' is not a flag"),
        (
            dict(npu__mindspeed_flags=["--sparse-mode=3"]),
            "mindspeed",
            r"--sparse-mode=3 is set from mtrain's own keys",
        ),
        (
            dict(npu__mindspeed_flags=["--pipeline-model-parallel-size=4"]),
            "mindspeed",
            r"--pipeline-model-parallel-size=4 is set from mtrain's own keys",
        ),
        (
            dict(npu__mindspeed_flags=["--use-flash-attn"]),
            "mindspeed",
            r"--use-flash-attn is set from mtrain's own keys",
        ),
    ],
)
def test_refused_combinations(changes, kernels, message):
    if "finetuning_type__lora" in changes:
        changes.pop("finetuning_type__lora")
        cfg = config(**changes)
        cfg.finetuning_type, cfg.load = "lora", "base_ckpt"
    else:
        cfg = config(**changes)
    plan = validate(cfg, world_size=16)
    with pytest.raises(ConfigError, match=message):
        mindspeed.check(cfg, plan, kernels)


@pytest.mark.parametrize(
    "kernels, ops, sp, message",
    [
        ("local", {}, True, r"sequence_parallel=true needs a norm that supports it.*kernels=local"),
        ("sdpa", {}, True, r"kernels=sdpa"),
        (
            "torch_npu",
            dict(flash_attn=False),
            False,
            r"npu.fused_rope=true needs npu.flash_attn=true",
        ),
    ],
)
def test_kernel_choices_refused(kernels, ops, sp, message):
    cfg = config(**{f"npu__{k}": v for k, v in ops.items()})
    with pytest.raises(ConfigError, match=message):
        layers.check(kernels, cfg.npu, sp)


def test_sequence_parallel_is_accepted_where_the_norm_supports_it():
    for kernels in ("te", "torch_npu", "mindspeed"):
        layers.check(kernels, config().npu, True)


def test_kernels_auto_and_explicit_choices():
    assert layers.resolve_kernels("auto", "cpu") == "local"
    assert layers.resolve_kernels("sdpa", "cpu") == "sdpa"
    expect_cuda = "te" if accel.installed("transformer_engine") else "sdpa"
    assert layers.resolve_kernels("auto", "cuda") == expect_cuda
    with pytest.raises(ConfigError, match="kernels=mindspeed needs device=npu"):
        layers.resolve_kernels("mindspeed", "cpu")
    with pytest.raises(ConfigError, match="kernels=te needs device=cuda"):
        layers.resolve_kernels("te", "cpu")
    if not accel.installed("torch_npu"):
        with pytest.raises(ConfigError, match="kernels=torch_npu needs torch_npu"):
            layers.resolve_kernels("torch_npu", "cpu")


def test_unknown_kernels_value_is_refused():
    with pytest.raises(ConfigError, match="kernels=fast is not one of auto, local"):
        validate(config_with(kernels="fast"), world_size=16)


def config_with(**top):
    cfg = config()
    for key, value in top.items():
        setattr(cfg, key, value)
    return cfg


def test_runtime_defaults_keep_what_the_user_set():
    env = {"TASK_QUEUE_ENABLE": "1"}
    applied = apply_npu_defaults(env)
    assert env["TASK_QUEUE_ENABLE"] == "1" and "TASK_QUEUE_ENABLE" not in applied
    assert env["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"
    assert env["CPU_AFFINITY_CONF"] == "1" and env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert set(env) == set(NPU_DEFAULTS)


# --- import order, with fakes -----------------------------------------------------------------

FAKE_ADAPTOR = """
import json, os, sys
import torch_npu.contrib.transfer_to_npu as t
json.dump({
    "argv": sys.argv[1:],
    "megatron_loaded": any(m.startswith("megatron") for m in sys.modules),
    "transfer_to_npu": getattr(t, "imported", False),
    "task_queue": os.environ.get("TASK_QUEUE_ENABLE"),
}, open(os.environ["ADAPTOR_RECORD"], "w"))
"""

# MindSpeed's parsed arguments, where mtrain puts the typed training arguments after the import.
FAKE_ARGS = """
import argparse
NAMESPACE = argparse.Namespace(context_parallel_size="1")
def get_mindspeed_args():
    return NAMESPACE
"""

STARTUP = """
import sys, json, types, torch
torch.npu = types.SimpleNamespace(  # the emulation has no device; pretend 8 NPUs
    is_available=lambda: True, device_count=lambda: 8, set_device=lambda i: None,
    current_device=lambda: 0)
from mtrain import kernels
from mtrain.config.model import load_preset
from mtrain.config.schema import TrainingCommandConfig, validate
cfg = TrainingCommandConfig(model=load_preset("qwen3_tiny"))
cfg.train.iters, cfg.train.seq_length, cfg.data.path = 1, 64, "x.jsonl"
cfg.device, cfg.kernels, cfg.parallel.tp, cfg.parallel.pp = "npu", "{kernels}", 1, 1
plan = validate(cfg, world_size=1)
argv_before = list(sys.argv)
started = kernels.start(cfg, plan, cfg.model.spec())
typed = getattr(sys.modules.get("mindspeed.args_utils"), "NAMESPACE", None)
print(json.dumps({{"kernels": started, "argv_restored": sys.argv == argv_before,
                  "typed": None if typed is None else vars(typed)}}))
import megatron.core  # after MindSpeed, as in a run
"""


def fake_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    (site / "mindspeed").mkdir(parents=True)
    (site / "mindspeed" / "__init__.py").write_text("")
    (site / "mindspeed" / "megatron_adaptor.py").write_text(FAKE_ADAPTOR)
    (site / "mindspeed" / "args_utils.py").write_text(FAKE_ARGS)
    return site


def run_startup(tmp_path, kernels="auto", env=None):
    record = tmp_path / "adaptor.json"
    paths = [str(fake_site(tmp_path)), str(ROOT / "tests" / "npu_emulation"), str(ROOT)]
    environ = {k: v for k, v in os.environ.items() if k not in NPU_DEFAULTS}
    environ.update(PYTHONPATH=os.pathsep.join(paths), ADAPTOR_RECORD=str(record), **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-c", STARTUP.format(kernels=kernels), "user=arg"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result, json.loads(record.read_text()) if record.exists() else None


def test_mindspeed_is_imported_after_torch_npu_before_megatron_with_the_flags(tmp_path):
    result, seen = run_startup(tmp_path, env={"TASK_QUEUE_ENABLE": "1"})
    typed = result.pop("typed")
    assert result == {"kernels": "mindspeed", "argv_restored": True}
    # Megatron-LM's training arguments, typed, replace what MindSpeed parsed as strings.
    assert typed["context_parallel_size"] == 1 and typed["seq_length"] == 64
    assert typed["num_layers"] == 4 and typed["use_legacy_models"] is False
    assert seen["megatron_loaded"] is False
    assert seen["transfer_to_npu"] is True
    assert seen["task_queue"] == "1"  # the user's value wins over the default 2
    assert "--use-flash-attn" in seen["argv"] and "user=arg" not in seen["argv"]


def test_torch_npu_kernels_skip_mindspeed(tmp_path):
    result, seen = run_startup(tmp_path, kernels="torch_npu")
    assert result["kernels"] == "torch_npu" and seen is None


def test_megatron_imported_first_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron", sys.modules.get("megatron") or object())
    with pytest.raises(RuntimeError, match="megatron was imported before MindSpeed"):
        mindspeed.install(["--use-flash-attn"], {})


def test_env_reports_torch_npu_and_warns_about_a_torch_mismatch():
    path = os.pathsep.join([str(ROOT / "tests" / "npu_emulation"), str(ROOT)])
    proc = subprocess.run(
        [sys.executable, "-m", "mtrain.env", "device=cpu"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = dict(line.split(None, 1) for line in proc.stdout.splitlines() if " " in line)
    assert rows["torch-npu"].strip() == "2.7.1"
    assert "does not match torch-npu 2.7.1" in rows["WARNING"]
    assert "pip install torch==2.7.1" in rows["WARNING"]


def test_version_warnings():
    from mtrain.accel.npu import version_warnings

    ok = {"torch": "2.7.1+cpu", "torch-npu": "2.7.1.post1", "megatron-core": "0.12.1"}
    assert version_warnings({**ok, "mindspeed": "0.12.1"}) == []
    (text,) = version_warnings({**ok, "megatron-core": "0.13.0", "mindspeed": "0.12.1"})
    assert "megatron-core is 0.13.0" in text
