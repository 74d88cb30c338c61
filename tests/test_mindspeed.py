"""MindSpeed's own code under mtrain, on CPU: `kernels=mindspeed` against `kernels=local`.

Needs a checkout of the public Ascend/MindSpeed repository, branch 2.3.0_core_r0.12.1, named by
MTRAIN_MINDSPEED_SRC (not installed: the launched processes get it on PYTHONPATH, so this
environment stays MindSpeed-free); skipped without it. Those processes also get the test-only
torch_npu emulation (tests/npu_emulation with TORCH_NPU_EMULATION_HOST=1: `torch.npu`, "npu"
devices and MindSpeed's op builders answered by plain-PyTorch ops) and mtrain's test-only switch
that lets `kernels=mindspeed` run on device=cpu. MindSpeed's adaptor then patches megatron-core
for real and the run trains on gloo.

Every run starts from the same converted tiny model and data in fp32, so the MindSpeed curve is
held to the local spec's number for number (1e-5). Sequence parallelism changes no arithmetic
that matters here: the local spec cannot run it (megatron's torch RMSNorm refuses it), so the
references run without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from converters import hf2mcore
from converters.hf2mcore import HF2McoreConfig
from mtrain.kernels.mindspeed import CPU_TEST_SWITCH, TESTED_RELEASE, release
from mtrain.models.tiny import corpus, write_chat_task, write_preference_task
from tests.conftest import TINY
from tests.torchrun import launch

ROOT = Path(__file__).resolve().parent.parent
SRC = os.environ.get("MTRAIN_MINDSPEED_SRC")
pytestmark = [
    pytest.mark.mindspeed,
    pytest.mark.slow,
    pytest.mark.skipif(
        not SRC,
        reason="MTRAIN_MINDSPEED_SRC does not name a MindSpeed checkout (Ascend/MindSpeed, "
        "branch 2.3.0_core_r0.12.1); see the README's 'Ascend NPU' section",
    ),
]
ITERS = 6
FP32 = 1e-5
# bf16: both runs round every matmul and norm to bf16, but not at the same places (MindSpeed's
# norm and SwiGLU compute in fp32 inside one op); 12 steps at lr 1e-3 stay within this.
BF16 = 2e-2


def mindspeed_env(tmp: Path) -> dict[str, str]:
    src = Path(SRC).resolve()
    found = release(src / "mindspeed")
    assert found == TESTED_RELEASE, (
        f"MTRAIN_MINDSPEED_SRC={src} holds MindSpeed release {found}, not {TESTED_RELEASE} "
        "(check out branch 2.3.0_core_r0.12.1)"
    )
    paths = [ROOT / "tests" / "npu_emulation", src, ROOT]
    return {
        "PYTHONPATH": os.pathsep.join(map(str, paths)),
        "TORCH_NPU_EMULATION_HOST": "1",
        CPU_TEST_SWITCH: "1",
        # MindSpeed's adaptor deletes the whole extensions root when it finds a lock file there.
        "TORCH_EXTENSIONS_DIR": str(tmp / "torch_extensions"),
    }


@pytest.fixture(scope="module")
def setup(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("mindspeed")
    hf = tiny_hf(TINY)
    with open(root / "corpus.jsonl", "w") as f:
        for line in corpus(2000, seed=1):
            f.write(json.dumps({"text": line}) + "\n")
    write_chat_task(root / "chat.jsonl")
    write_preference_task(root / "pairs.jsonl")
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(root / "c22"), tp=2, pp=2))
    hf2mcore.convert(
        HF2McoreConfig(hf_dir=str(hf), out_dir=str(root / "c22_vpp2"), tp=2, pp=2, vpp=2)
    )
    return root, hf, mindspeed_env(root)


def run(setup, command: str, name: str, kernels: str, **extra) -> list[dict]:
    """`python -m mtrain.<command>` at TP2 x PP2 (distributed optimizer) on 4 processes;
    kernels=mindspeed adds sequence parallelism and MindSpeed's environment."""
    root, hf, env = setup
    metrics = root / f"{name}-{kernels}.jsonl"
    metrics.unlink(missing_ok=True)
    data = {"pt": "corpus.jsonl", "sft": "chat.jsonl", "dpo": "pairs.jsonl"}[command]
    args = {
        "+model": "qwen3_tiny",
        "model.hf_dir": hf,
        "load": root / "c22",
        "data.path": root / data,
        "data.cache_dir": root / "cache",
        "train.iters": ITERS,
        "train.seq_length": 64,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        "train.precision": "fp32",
        "train.lr": 1e-3,
        "parallel.tp": 2,
        "parallel.pp": 2,
        "parallel.distributed_optimizer": "true",
        "device": "cpu",
        "kernels": kernels,
        "log.interval": 1,
        "log.metrics_file": metrics,
    }
    if kernels == "mindspeed":
        args["parallel.sequence_parallel"] = "true"
    args.update(extra)
    proc = launch(
        4,
        "-m",
        f"mtrain.{command}",
        *(f"{k}={v}" for k, v in args.items()),
        env=env if kernels == "mindspeed" else None,
    )
    if kernels == "mindspeed":
        assert "kernels=mindspeed (MindSpeed 2.3.0" in proc.stdout + proc.stderr
    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(history) == ITERS
    return history


def differences(a: list[dict], b: list[dict], key: str = "loss") -> list[float]:
    return [abs(x[key] - y[key]) for x, y in zip(a, b)]


@pytest.fixture(scope="module")
def pt_local(setup):
    return run(setup, "pt", "pt", "local")


def test_pt_tp2pp2_sp_distributed_optimizer_equals_local(setup, pt_local):
    ours = run(setup, "pt", "pt", "mindspeed")
    diffs = differences(ours, pt_local)
    print("pt mindspeed vs local:", max(diffs))
    assert max(diffs) < FP32, diffs
    assert max(differences(ours, pt_local, "grad_norm")) < FP32
