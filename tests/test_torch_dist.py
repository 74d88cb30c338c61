"""checkpoint.format=torch_dist: megatron-core's distributed checkpoints, saved by training on
CPU (gloo), resumed at another TP x PP x DP, and exported to HF by converters.mcore2hf."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from converters import hf2mcore, mcore2hf
from converters.hf2mcore import HF2McoreConfig
from converters.mcore2hf import McoreToHFConfig
from mtrain.checkpoint import MegatronCheckpoint
from mtrain.checkpoint.dist_format import DistReader
from mtrain.errors import CheckpointError
from mtrain.models.tiny import corpus
from tests.conftest import TINY
from tests.torchrun import launch, run_many

pytestmark = pytest.mark.slow
ITERS = 4


@pytest.fixture(scope="module")
def setup(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_dist")
    hf = tiny_hf(TINY)
    with open(root / "corpus.jsonl", "w") as f:
        for line in corpus(400, seed=3):
            f.write(json.dumps({"text": line}) + "\n")
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(root / "c22"), tp=2, pp=2))
    return root, hf


def pt_overrides(setup, tp: int, pp: int, name: str, **extra) -> list[str]:
    root, hf = setup
    args = {
        "+model": "qwen3_tiny", "model.hf_dir": hf, "load": root / "c22",
        "data.path": root / "corpus.jsonl", "data.cache_dir": root / "cache",
        "train.iters": ITERS, "train.seq_length": 64, "train.global_batch_size": 4,
        "train.micro_batch_size": 1, "train.precision": "fp32", "train.lr": 1e-3,
        "parallel.tp": tp, "parallel.pp": pp, "parallel.distributed_optimizer": "true",
        "checkpoint.save_interval": 2, "device": "cpu", "log.metrics_file": root / f"{name}.jsonl",
        **extra,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in args.items()]


def losses(setup, name: str) -> list[float]:
    lines = (setup[0] / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def run_pt(setup, nproc: int, tp: int, pp: int, name: str, **extra) -> list[float]:
    launch(nproc, "-m", "mtrain.pt", *pt_overrides(setup, tp, pp, name, **extra))
    return losses(setup, name)


@pytest.fixture(scope="module")
def runs(setup):
    """The same TP2 x PP2 run saved in the legacy format (uninterrupted) and in torch_dist
    (stopped after 2 iterations, then resumed at TP1 x PP1 x DP2); the three TP2 x PP2 runs share
    one torchrun (tests/dist/runs.py)."""
    root = setup[0]
    dist = {"checkpoint.format": "torch_dist", "train.exit_after_iters": 2}
    plain = {"parallel.distributed_optimizer": "false"}
    first_runs = {
        "legacy": {"save": root / "legacy"},
        "dist_first": {"save": root / "dist", **dist},
        "plain_first": {"save": root / "plain", **dist, **plain},
    }
    plan = {name: ["pt", pt_overrides(setup, 2, 2, name, **extra)]
            for name, extra in first_runs.items()}  # fmt: skip
    run_many(4, plan, root, timeout=900)
    legacy, first, first_plain = (losses(setup, name) for name in first_runs)
    resumed = run_pt(setup, 2, 1, 1, "dist_resumed", save=root / "dist")
    resumed_plain = run_pt(setup, 1, 1, 1, "plain_resumed", save=root / "plain", **plain)
    return legacy, (first, resumed), (first_plain, resumed_plain)


def test_a_torch_dist_save_resumes_at_another_tp_pp_and_dp(runs, setup):
    """Weights, Adam moments and steps, scheduler and data position reshard, with the
    distributed optimizer (TP2 x PP2 -> TP1 x PP1 x DP2) and without it (-> one process)."""
    legacy = runs[0]  # distributed optimizer, like the first scenario
    assert runs[1][0] == legacy[:2]  # the save format does not change the run, bit for bit
    for first, resumed in runs[1:]:
        # without the distributed optimizer the reductions differ in order (1 ulp here and there)
        assert max(abs(a - b) for a, b in zip(first, legacy)) < 1e-5
        assert len(resumed) == ITERS - 2
        diffs = [abs(a - b) for a, b in zip(resumed, legacy[2:])]
        assert max(diffs) < 1e-5, diffs
    saved = MegatronCheckpoint.open(setup[0] / "dist", "2")
    assert saved.format == "torch_dist" and saved.saved_layout == (2, 2, 1) and saved.has_optimizer
    # the resumed run saves in the format its own config names (here the default, legacy)
    assert (setup[0] / "dist" / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt").is_file()


def test_mcore2hf_exports_a_torch_dist_checkpoint_exactly(runs, setup, tmp_path):
    root, hf = setup
    for name in ("legacy", "dist"):
        mcore2hf.convert(
            McoreToHFConfig(
                ckpt_dir=str(root / name), out_dir=str(tmp_path / name), hf_dir=str(hf),
                iteration="2",
            )
        )  # fmt: skip
    ours, theirs = (load_file(tmp_path / n / "model.safetensors") for n in ("dist", "legacy"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_torch_dist_metadata_naming_other_code_is_refused(runs, setup, tmp_path):
    copy = tmp_path / "iter_0000002"
    shutil.copytree(setup[0] / "dist" / "iter_0000002", copy)
    (copy / ".metadata").write_bytes(pickle.dumps(print))  # any callable outside the allowlist
    with pytest.raises(
        CheckpointError, match=r"refused to open: it asks to unpickle builtins.print"
    ):
        DistReader(copy)
