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
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from converters import hf2mcore
from converters.hf2mcore import HF2McoreConfig
from mtrain.config.model import load_preset
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
# bf16: both runs round matmuls and norms to bf16, but not at the same places (MindSpeed's fused
# norm and SwiGLU compute in fp32 inside one op); measured 1.3e-4 over the 6 steps.
BF16 = 2e-3


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
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(root / "c21"), tp=2, pp=1))
    return root, hf, mindspeed_env(root)


FUSED = ("npu_fusion_attention", "npu_rms_norm", "npu_swiglu", "npu_rotary_position_embedding")


def run(setup, command: str, name: str, kernels: str, **extra) -> tuple[list[dict], dict]:
    """`python -m mtrain.<command>` at TP2 x PP2 (distributed optimizer) on 4 processes;
    kernels=mindspeed adds sequence parallelism and MindSpeed's environment. Returns the
    metrics and, for MindSpeed, the emulated-op calls of each rank ({op: [count per rank]})."""
    root, hf, env = setup
    metrics = root / f"{name}-{kernels}.jsonl"
    metrics.unlink(missing_ok=True)
    record = root / f"ops-{name}"
    record.mkdir(exist_ok=True)
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
        env={**env, "TORCH_NPU_EMULATION_RECORD": str(record)} if kernels == "mindspeed" else None,
    )
    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(history) == ITERS
    calls: dict[str, list[int]] = {}
    if kernels == "mindspeed":
        assert "kernels=mindspeed (MindSpeed 2.3.0" in proc.stdout + proc.stderr
        ranks = [json.loads(f.read_text()) for f in sorted(record.glob("ops-*.json"))]
        assert len(ranks) == 4, ranks
        calls = {op: [r.get(op, 0) for r in ranks] for op in {op for r in ranks for op in r}}
    return history, calls


def differences(a: list[dict], b: list[dict], key: str = "loss") -> float:
    return max(abs(x[key] - y[key]) for x, y in zip(a, b))


def report(name: str, ours: list[dict], reference: list[dict]) -> float:
    diff = differences(ours, reference)
    print(f"{name}: max |loss(mindspeed) - loss(local)| over {ITERS} steps = {diff:.3g}")
    return diff


def ran_fused(calls: dict[str, list[int]], *ops: str) -> bool:
    """Every rank called each of `ops` (MindSpeed's fused paths, answered by the emulation)."""
    return all(min(calls.get(op, [0])) > 0 for op in ops)


@pytest.fixture(scope="module")
def pt_local(setup):
    return run(setup, "pt", "pt", "local")[0]


def test_pt_tp2pp2_sp_distributed_optimizer_equals_local(setup, pt_local):
    ours, calls = run(setup, "pt", "pt", "mindspeed")
    assert ran_fused(calls, *FUSED), calls
    assert report("pt", ours, pt_local) < FP32
    assert differences(ours, pt_local, "grad_norm") < FP32


def test_pt_with_every_npu_kernel_off_runs_none_of_them_and_equals_local(setup, pt_local):
    """npu.fused_rmsnorm / fused_swiglu = false are honoured although MindSpeed would apply its
    fused norm and SwiGLU anyway; npu.flash_attn=false runs (MindSpeed's own causal mask needs
    config fields megatron-core lacks)."""
    off = {
        f"npu.{k}": "false" for k in ("flash_attn", "fused_rmsnorm", "fused_swiglu", "fused_rope")
    }
    ours, calls = run(setup, "pt", "pt-unfused", "mindspeed", **off)
    assert all(count == 0 for counts in calls.values() for count in counts), calls
    assert report("pt, npu kernels off", ours, pt_local) < FP32


def test_pt_interleaved_vpp2_equals_local(setup, pt_local):
    vpp = {"load": setup[0] / "c22_vpp2", "parallel.vpp": 2}
    ours, calls = run(setup, "pt", "pt-vpp2", "mindspeed", **vpp)
    assert ran_fused(calls, *FUSED), calls
    assert report("pt vpp2", ours, pt_local) < FP32


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_pt_with_recompute_equals_local(setup, pt_local, recompute):
    ours, calls = run(setup, "pt", f"pt-{recompute}", "mindspeed", **{"train.recompute": recompute})
    assert ran_fused(calls, *FUSED), calls
    assert report(f"pt recompute={recompute}", ours, pt_local) < FP32


@pytest.mark.parametrize("algo", ["ulysses_cp_algo", "megatron_cp_algo"])
def test_pt_context_parallel_equals_local(setup, pt_local, algo):
    """MindSpeed's own context parallelism (Ulysses all-to-all; megatron_cp_algo = its ring
    attention, whose backward runs npu_fusion_attention_grad block by block) at TP2 x CP2, each
    sequence split over two ranks, against the local spec at TP2 x PP2 on the same batches."""
    cp = {"load": setup[0] / "c21", "parallel.pp": 1, "parallel.cp": 2, "parallel.cp_algo": algo}
    ours, calls = run(setup, "pt", f"pt-cp-{algo}", "mindspeed", **cp)
    assert ran_fused(calls, "npu_fusion_attention"), calls
    if algo == "megatron_cp_algo":  # the ring's own backward, block by block
        assert ran_fused(calls, "npu_fusion_attention_grad"), calls
    assert report(f"pt cp2 {algo}", ours, pt_local) < FP32
    assert differences(ours, pt_local, "grad_norm") < FP32


def test_pt_bf16_tracks_local_bf16(setup):
    bf16 = {"train.precision": "bf16"}
    reference, _ = run(setup, "pt", "pt-bf16", "local", **bf16)
    ours, calls = run(setup, "pt", "pt-bf16", "mindspeed", **bf16)
    assert ran_fused(calls, *FUSED), calls
    assert report("pt bf16", ours, reference) < BF16


def test_packed_sft_equals_local(setup):
    packed = {"data.packing": "true"}
    reference, _ = run(setup, "sft", "sft-packed", "local", **packed)
    ours, calls = run(setup, "sft", "sft-packed", "mindspeed", **packed)
    assert ran_fused(calls, *FUSED), calls
    assert report("sft packed", ours, reference) < FP32


def test_dpo_equals_local(setup):
    reference, _ = run(setup, "dpo", "dpo", "local")
    ours, calls = run(setup, "dpo", "dpo", "mindspeed")
    assert ran_fused(calls, *FUSED), calls
    assert report("dpo", ours, reference) < FP32
    assert differences(ours, reference, "rewards/margin") < FP32


def test_lora_packed_sft_equals_local(setup):
    lora = {"data.packing": "true", "finetuning_type": "lora", "lora.r": 8, "lora.alpha": 16}
    reference, _ = run(setup, "sft", "lora", "local", **lora)
    ours, calls = run(setup, "sft", "lora", "mindspeed", **lora)
    assert ran_fused(calls, *FUSED), calls
    assert report("lora", ours, reference) < FP32


@pytest.fixture(scope="module")
def moe_setup(setup, tiny_hf):
    """The tiny Qwen3-MoE (8 experts, top-2), converted at TP2 EP2 with per-expert names."""
    root, _, env = setup
    hf = tiny_hf(load_preset("qwen3_moe_tiny").spec())
    out = root / "moe_tp2ep2"
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(out), tp=2, pp=1, ep=2))
    return (root, hf, env), {"+model": "qwen3_moe_tiny", "load": out, "parallel.pp": 1,
                             "parallel.ep": 2, "moe.aux_loss_coef": 0.01}  # fmt: skip


def test_moe_grouped_gemm_equals_local_sequential_experts(moe_setup):
    """MindSpeed's grouped-GEMM experts (--moe-grouped-gemm: its GMM op for each rank's experts,
    forward and backward) at TP2 EP2 against megatron-core's SequentialMLP (kernels=local) on
    the same converted checkpoint, with the aux loss on; both save, and the grouped run's
    checkpoint holds the per-expert names with the same trained weights."""
    setup, moe = moe_setup
    root = setup[0]
    reference, _ = run(setup, "pt", "moe", "local", **moe, save=root / "moe-local")
    grouped = {**moe, "moe.grouped_gemm": "true", "save": root / "moe-grouped"}
    ours, calls = run(setup, "pt", "moe", "mindspeed", **grouped)
    assert ran_fused(calls, "npu_gmm", "npu_gmm_backward", *FUSED), calls
    assert report("moe grouped gemm", ours, reference) < FP32
    assert differences(ours, reference, "moe_aux_loss") < FP32
    assert differences(ours, reference, "expert_load_max") == 0
    worst = 0.0
    for rank_dir in sorted((root / "moe-local" / f"iter_{ITERS:07d}").glob("mp_rank_*")):
        want = torch.load(rank_dir / "model_optim_rng.pt", weights_only=False)["model"]
        path = root / "moe-grouped" / f"iter_{ITERS:07d}" / rank_dir.name / "model_optim_rng.pt"
        got = torch.load(path, weights_only=False)
        assert got["args"].mtrain_grouped_gemm_experts is True
        got = got["model"]
        assert sorted(got) == sorted(want) and any(".local_experts.3." in k for k in got)
        for name, tensor in want.items():
            if torch.is_tensor(tensor):
                assert got[name].is_contiguous(), name
                worst = max(worst, (got[name] - tensor).abs().max().item())
    print(f"moe grouped gemm: max |weight difference| after {ITERS} steps = {worst:.3g}")
    assert worst < FP32


AFTER_THE_ADAPTOR = """
import json, sys
from mtrain import accel, env, kernels
from mtrain.kernels import mindspeed
accel.activate("cpu", before_megatron=lambda: mindspeed.install(["--use-flash-attn"], {}))
import importlib.metadata, transformer_engine  # MindSpeed's dummy modules now import
rows = dict(env.report("cpu"))
print(json.dumps({
    "te_metadata_says": importlib.metadata.version("transformer-engine"),
    "te_installed": accel.installed("transformer_engine"),
    "env_te": rows["transformer-engine"],
    "env_mindspeed": rows["mindspeed"],
    "compile_disabled": mindspeed.compile_disabled(),
    "kernels": kernels.describe("mindspeed"),
}))
"""


def test_after_the_adaptor_te_is_not_taken_for_installed_and_the_release_is_named(setup):
    proc = subprocess.run(
        [sys.executable, "-c", AFTER_THE_ADAPTOR],
        capture_output=True,
        text=True,
        env={**os.environ, **setup[2]},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["te_metadata_says"] == "2.2.0"  # what MindSpeed makes it answer
    assert seen["te_installed"] is False and seen["env_te"] == "not installed"
    assert seen["env_mindspeed"].endswith("(release 2.3.0)")
    assert seen["compile_disabled"] is True
    assert (
        seen["kernels"]
        == "mindspeed (MindSpeed 2.3.0, which made torch.compile / torch.jit.script no-ops)"
    )
