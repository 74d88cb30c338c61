"""Checkpoints are never lost, and a bad checkpoint is refused in one line before compute is spent.

- `checkpoint.keep_last` removes only the run's own older saves: never the one just written, the
  one the tracker names, or a directory numbered after it (a tracker rolled back by hand).
- Resuming is checked before the model is built: optimizer layout, a converted checkpoint in
  `save=`, damaged or foreign files. A file that asks to unpickle code is refused by name.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest
import torch

from converters import hf2mcore
from converters.hf2mcore import HF2McoreConfig
from mtrain.checkpoint import (
    DISTRIB_OPTIM_FILE,
    TRACKER,
    MegatronCheckpoint,
    check_start,
    load_checkpoint_file,
    load_rank_file,
    read_tracker,
    save_rank_file,
)
from mtrain.checkpoint.training import _move_into_place, prune, saved_iterations
from mtrain.config.model import load_preset
from mtrain.config.schema import TrainingCommandConfig, validate
from mtrain.errors import CheckpointError, ConfigError
from tests.conftest import TINY


def make_iterations(save, *iterations):
    for it in iterations:
        (save / f"iter_{it:07d}" / "mp_rank_00").mkdir(parents=True)
    (save / TRACKER).write_text(f"{iterations[-1]}\n")


def test_keep_last_keeps_the_newest_saves_of_the_run(tmp_path):
    make_iterations(tmp_path, 10, 20, 30, 40)
    prune(tmp_path, 40, keep_last=2)
    assert saved_iterations(tmp_path) == [30, 40]


def test_keep_last_never_removes_a_later_directory_or_the_one_just_saved(tmp_path):
    """The tracker was rolled back by hand from 300 to 100 and the run saved 110: 200 and 300
    are not this run's history. With keep_last=1 the run keeps 110 (the tracker's) and
    removes only its own older saves."""
    make_iterations(tmp_path, 50, 100, 200, 300)
    (tmp_path / "iter_0000110" / "mp_rank_00").mkdir(parents=True)
    (tmp_path / TRACKER).write_text("110\n")
    (tmp_path / "iter_notes").mkdir()  # not a checkpoint name: left alone
    prune(tmp_path, 110, keep_last=1)
    assert saved_iterations(tmp_path) == [110, 200, 300]
    assert read_tracker(tmp_path) == 110 and (tmp_path / "iter_0000110").is_dir()
    assert (tmp_path / "iter_notes").is_dir()


def test_resaving_an_iteration_replaces_it_only_once_the_new_copy_is_in_place(tmp_path):
    final, partial = tmp_path / "iter_0000005", tmp_path / ".partial_iter_0000005"
    (final / "mp_rank_00").mkdir(parents=True)
    (final / "old").write_text("old")
    partial.mkdir()
    (partial / "new").write_text("new")
    _move_into_place(partial, final)
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000005"]


@pytest.fixture(scope="module")
def saved(tiny_hf, tmp_path_factory):
    """A 'training' checkpoint at iteration 5 of the tiny model (the converted weights, an
    optimizer entry), with the distributed optimizer's shard file."""
    root = tmp_path_factory.mktemp("safety")
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(tiny_hf(TINY)), out_dir=str(root / "release")))
    save = root / "save"
    save.mkdir()
    shutil.copytree(root / "release" / "release", save / "iter_0000005")
    rank = save / "iter_0000005" / "mp_rank_00"
    payload = load_rank_file(rank / "model_optim_rng.pt", mmap=False)
    save_rank_file(rank / "model_optim_rng.pt", {**payload, "iteration": 5, "optimizer": {}})
    torch.save({}, rank / DISTRIB_OPTIM_FILE)
    (save / TRACKER).write_text("5\n")
    return root


def run_config(**changes) -> TrainingCommandConfig:
    cfg = TrainingCommandConfig(model=load_preset("qwen3_tiny"))
    cfg.train.iters, cfg.train.seq_length, cfg.data.path = 10, 64, "corpus.jsonl"
    cfg.parallel.tp = cfg.parallel.pp = 1
    for key, value in changes.items():
        group, name = key.split("__") if "__" in key else (None, key)
        setattr(getattr(cfg, group) if group else cfg, name, value)
    return cfg


def start(cfg):
    spec = cfg.model.spec()
    check_start(cfg, spec, validate(cfg, 1, spec))


def test_resuming_with_the_distributed_optimizer_flipped_is_refused_up_front(saved):
    save = str(saved / "save")
    start(run_config(save=save, parallel__distributed_optimizer=True))  # as saved: fine
    with pytest.raises(
        ConfigError, match=r"saved with parallel.distributed_optimizer=true; resume"
    ):
        start(run_config(save=save, parallel__distributed_optimizer=False))
    shard = saved / "save" / "iter_0000005" / "mp_rank_00" / DISTRIB_OPTIM_FILE
    shard.rename(shard.with_suffix(".bak"))
    try:
        with pytest.raises(ConfigError, match=r"saved with parallel.distributed_optimizer=false"):
            start(run_config(save=save, parallel__distributed_optimizer=True))
    finally:
        shard.with_suffix(".bak").rename(shard)


def test_a_converted_checkpoint_in_save_is_refused_with_the_fix(saved):
    release = str(saved / "release")
    with pytest.raises(ConfigError, match=r"holds a converted \(release\) checkpoint.*load="):
        start(run_config(save=release, load=release, checkpoint__finetune=True))


def test_a_rank_file_that_unpickles_code_is_refused_by_name(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo unpickled",))

    path = tmp_path / "model_optim_rng.pt"
    torch.save({"args": Payload()}, path)
    with pytest.raises(CheckpointError) as err:
        load_rank_file(path)
    message = str(err.value)
    assert "system" in message and "not a checkpoint mtrain will open" in message
    assert "weights_only" not in message and "\n" not in message


@pytest.mark.parametrize(
    "payload, message",
    [
        ([1, 2], r"holds a list, not a Megatron rank file"),
        ({"model": {}}, r"has no 'args'"),
        ({"args": "tp=2"}, r"has no 'args'"),
    ],
)
def test_rank_files_of_the_wrong_shape_are_refused(tmp_path, payload, message):
    path = tmp_path / "model_optim_rng.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=message):
        load_rank_file(path)


def test_args_saved_as_a_dict_are_read(saved, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved / "release", ckpt)
    path = ckpt / "release" / "mp_rank_00" / "model_optim_rng.pt"
    payload = load_rank_file(path, mmap=False)
    payload["args"] = vars(payload["args"])
    save_rank_file(path, payload)
    assert MegatronCheckpoint.open(ckpt).spec == TINY
    assert isinstance(load_rank_file(path)["args"], argparse.Namespace)


def test_a_damaged_optimizer_shard_is_one_line(tmp_path):
    path = tmp_path / DISTRIB_OPTIM_FILE
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=rf"{DISTRIB_OPTIM_FILE}: cannot be read"):
        load_checkpoint_file(path)


def test_a_tracker_that_is_not_text_is_refused(tmp_path):
    (tmp_path / TRACKER).write_bytes(b"\xff\xfe5")
    with pytest.raises(CheckpointError, match=r"not text; it should hold 'release' or an"):
        read_tracker(tmp_path)


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120
    )


def assert_one_line(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_an_iteration_that_is_not_a_number_is_one_line(saved, tmp_path):
    proc = cli(
        "converters.mcore2hf", f"ckpt_dir={saved / 'save'}", f"out_dir={tmp_path / 'o'}",
        "iteration=abc",
    )  # fmt: skip
    assert_one_line(proc, "iteration=abc", "expected 'release' or an integer")


def test_an_out_dir_below_a_file_is_one_line(tiny_hf, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = cli("converters.hf2mcore", f"hf_dir={tiny_hf(TINY)}", f"out_dir={blocker / 'out'}")
    assert_one_line(proc, "out_dir=", "is a file, so nothing can be created below it")


def test_a_numbered_converted_checkpoint_is_a_weights_only_start(tiny_hf, saved, tmp_path):
    """MindSpeed-LLM reads only numbered trackers: hf2mcore iteration=1 writes iter_0000001
    with tracker 1, the same tensors as release, and mtrain starts from it as from release."""
    out = tmp_path / "numbered"
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(tiny_hf(TINY)), out_dir=str(out), iteration="1"))
    assert (out / TRACKER).read_text() == "1\n"
    ckpt = MegatronCheckpoint.open(out)
    assert ckpt.iter_dir.name == "iter_0000001" and not ckpt.has_optimizer
    numbered = load_rank_file(ckpt.rank_file(0, 0))
    release = load_rank_file(saved / "release" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    assert numbered["iteration"] == 1 and set(numbered["model"]) == set(release["model"])
    assert all(torch.equal(numbered["model"][k], release["model"][k]) for k in release["model"])
    start(run_config(load=str(out)))  # a start, not a resume: accepted
    with pytest.raises(ConfigError, match=r"holds a converted \(iter_0000001\) checkpoint"):
        start(run_config(save=str(out)))
