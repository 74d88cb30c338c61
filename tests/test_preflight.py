"""Output locations are checked before the model is built: a run never trains for hours and then
fails at its first save or its first metrics line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtrain.config.model import load_preset
from mtrain.config.schema import TrainingCommandConfig
from mtrain.errors import ConfigError
from mtrain.estimates import checkpoint_bytes
from mtrain.paths import check_directory
from mtrain.preflight import check_outputs


def config(**changes) -> TrainingCommandConfig:
    cfg = TrainingCommandConfig(model=load_preset("qwen3_tiny"))
    cfg.train.iters, cfg.train.seq_length, cfg.data.path = 10, 128, "corpus.jsonl"
    for key, value in changes.items():
        group, name = key.split("__") if "__" in key else (None, key)
        setattr(getattr(cfg, group) if group else cfg, name, value)
    return cfg


@pytest.fixture()
def a_file(tmp_path):
    path = tmp_path / "plain_file"
    path.write_text("not a directory\n")
    return path


def test_save_that_is_a_file_or_below_one_is_refused(a_file):
    with pytest.raises(ConfigError, match=r"^save=.*plain_file exists and is not a directory"):
        check_outputs(config(save=str(a_file)), config().model.spec())
    with pytest.raises(ConfigError, match=r"^save=.*plain_file is a file, so nothing can be"):
        check_outputs(config(save=str(a_file / "ckpt")), config().model.spec())


def test_log_outputs_below_a_file_are_refused(a_file, tmp_path):
    spec = config().model.spec()
    with pytest.raises(ConfigError, match=r"^log.metrics_file=.*plain_file is a file"):
        check_outputs(config(log__metrics_file=str(a_file / "m.jsonl")), spec)
    with pytest.raises(ConfigError, match=r"^log.metrics_file=.* is a directory"):
        check_outputs(config(log__metrics_file=str(tmp_path)), spec)
    with pytest.raises(ConfigError, match=r"^log.tensorboard_dir=.*plain_file is a file"):
        check_outputs(config(log__tensorboard_dir=str(a_file / "tb")), spec)


def test_outputs_that_do_not_exist_yet_are_fine_and_not_created(tmp_path):
    cfg = config(
        save=str(tmp_path / "a" / "b"),
        log__metrics_file=str(tmp_path / "logs" / "m.jsonl"),
        log__tensorboard_dir=str(tmp_path / "tb"),
    )
    check_outputs(cfg, cfg.model.spec())
    assert list(tmp_path.iterdir()) == []


def test_too_little_free_space_for_one_checkpoint_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"GiB free on its filesystem, but one checkpoint"):
        check_directory("save", str(tmp_path), need_bytes=1e18)


def test_checkpoint_size_counts_weights_and_adam_or_only_adapters():
    full = config()
    spec = full.model.spec()
    # bf16: 2 bytes of weights + 12 of Adam (fp32 master weights and two moments) per parameter
    assert checkpoint_bytes(full, spec) == spec.num_parameters() * 14
    lora = config(finetuning_type="lora", load="base")
    assert checkpoint_bytes(lora, spec) < checkpoint_bytes(full, spec) / 5


def test_dry_run_refuses_an_unusable_save_in_one_line(a_file):
    proc = subprocess.run(
        [
            sys.executable, "-m", "mtrain.pt", "+model=qwen3_tiny", "dry_run=true",
            "train.iters=10", "train.seq_length=64", "data.path=x.jsonl", f"save={a_file / 'ckpt'}",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: save={a_file / 'ckpt'}: {a_file} is a file, so nothing can be created below it; "
        "choose another location"
    ]
