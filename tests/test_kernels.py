"""Every layer implementation (`kernels=`) computes the HF model, on CPU.

The torch_npu spec runs against the plain-PyTorch emulation of its ops (tests/npu_emulation,
installed as `torch_npu` in the worker processes only), so a wrong layout, mask polarity or
sparse mode fails here rather than on a cluster. Transformer Engine's spec needs CUDA; only its
checkpoint-name mapping is tested here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from converters import hf2mcore
from converters.hf2mcore import HF2McoreConfig
from mtrain.kernels import te
from mtrain.kernels.torch_npu import segment_ends
from tests.conftest import tiny_spec
from tests.torchrun import run_many, torchrun

TOLERANCE = 1e-5  # fp32 logits
EMULATION = Path(__file__).parent / "npu_emulation"


@pytest.mark.slow
def test_every_kernel_choice_reproduces_hf_for_causal_and_packed_rows(tiny_hf, tmp_path):
    hf = tiny_hf(tiny_spec(num_layers=2))
    ckpt = tmp_path / "tp2"
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(ckpt), tp=2, pp=1))
    cases = [
        "sdpa",
        "torch_npu",
        "torch_npu:fused_rope=0",
        "torch_npu:fused_rmsnorm=0,fused_swiglu=0,fused_rope=0",
    ]
    path = os.pathsep.join([str(EMULATION), os.environ.get("PYTHONPATH", "")])
    result = tmp_path / "result.json"
    torchrun("kernel_parity.py", 2, result, hf, ckpt, *cases, env={"PYTHONPATH": path})
    diffs = json.loads(result.read_text())
    assert set(diffs) == {"local", *cases}
    for case, d in diffs.items():
        assert d["plain"] < TOLERANCE and d["packed"] < TOLERANCE, (case, d)
        assert d["grad_vs_local"] < 1e-5, (case, d)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernels_reproduce_hf_on_the_gpu(tiny_hf, tmp_path):
    """Run where a GPU is lent: sdpa (and te, when installed) on CUDA against HF in fp32."""
    from mtrain import accel

    hf = tiny_hf(tiny_spec(num_layers=2))
    tp = min(2, torch.cuda.device_count())
    ckpt = tmp_path / "c"
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(ckpt), tp=tp, pp=1))
    cases = ["sdpa"] + (["te"] if accel.installed("transformer_engine") else [])
    result = tmp_path / "result.json"
    env = {"KERNEL_PARITY_DEVICE": "cuda"}
    torchrun("kernel_parity.py", tp, result, hf, ckpt, *cases, env=env)
    diffs = json.loads(result.read_text())
    for case, d in diffs.items():  # GPU reduction orders differ from the CPU reference
        assert d["plain"] < 1e-4 and d["packed"] < 1e-4, (case, d)
        assert d["grad_vs_local"] < 1e-4, (case, d)


def test_packed_rows_become_one_varlen_sequence_list():
    cu = torch.tensor([[0, 7, 16, 32, 32], [0, 12, 25, 32, 32]])
    assert segment_ends(cu, 32) == [7, 16, 32, 44, 57, 64]


def test_te_names_map_to_local_names_and_back():
    local = {
        "decoder.layers.0.input_layernorm.weight": 1,
        "decoder.layers.0.self_attention.linear_qkv.weight": 2,
        "decoder.layers.0.self_attention.q_layernorm.weight": 3,
        "decoder.layers.0.pre_mlp_layernorm.weight": 4,
        "decoder.layers.0.mlp.linear_fc1.weight": 5,
        "decoder.final_layernorm.weight": 6,
        "embedding.word_embeddings.weight": 7,
    }
    state = {f"module.{k}": v for k, v in local.items()}
    te.to_te_names(state, "module.")
    assert state["module.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"] == 1
    assert state["module.decoder.layers.0.mlp.linear_fc1.layer_norm_weight"] == 4
    assert "module.decoder.final_layernorm.weight" in state  # not a fused layer norm
    state["module.decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
    te.to_local_names(state, "module.")
    assert state == {f"module.{k}": v for k, v in local.items()}


def test_te_state_dict_hooks_present_local_names():
    class Fused(torch.nn.Module):  # stands in for TELayerNormColumnParallelLinear
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2, 2))
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(2))

        def get_extra_state(self):
            return torch.tensor([7])

        def set_extra_state(self, state):
            self.extra = state

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attention = torch.nn.Module()
            self.self_attention.linear_qkv = Fused()

    model = torch.nn.Module()
    model.decoder = torch.nn.Module()
    model.decoder.layers = torch.nn.ModuleList([Layer()])
    te.present_local_names(model)
    state = model.state_dict()
    assert sorted(state) == [
        "decoder.layers.0.input_layernorm.weight",
        "decoder.layers.0.self_attention.linear_qkv.weight",
    ]
    state["decoder.layers.0.input_layernorm.weight"] = torch.full((2,), 3.0)
    model.load_state_dict(state)  # strict: the extra state is filled in, names mapped back
    qkv = model.decoder.layers[0].self_attention.linear_qkv
    assert torch.equal(qkv.layer_norm_weight.data, torch.full((2,), 3.0))
    assert torch.equal(qkv.extra, torch.tensor([7]))


PACKED_SFT_RUNS = {  # name: overrides; all in one torchrun (process start-up is most of it)
    "local": ["kernels=local"],
    "npu": ["kernels=torch_npu"],
    "sp": ["kernels=torch_npu", "parallel.sequence_parallel=true"],
    "npu_lora": ["kernels=torch_npu", "finetuning_type=lora", "train.lr=1e-2"],
    "sp_lora": [
        "kernels=torch_npu", "finetuning_type=lora", "train.lr=1e-2",
        "parallel.sequence_parallel=true",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def packed_sft(tiny_hf, tmp_path_factory):
    """Packed SFT at TP=2 x PP=2 from one converted checkpoint, per PACKED_SFT_RUNS; returns
    {name: loss curve}."""
    from mtrain.models.tiny import write_chat_task

    root = tmp_path_factory.mktemp("kernels_sft")
    hf = tiny_hf(tiny_spec())
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(root / "c"), tp=2, pp=2))
    write_chat_task(root / "chat.jsonl")
    common = {
        "+model": "qwen3_tiny",
        "model.hf_dir": hf,
        "load": root / "c",
        "data.path": root / "chat.jsonl",
        "data.cache_dir": root / "cache",
        "data.packing": "true",
        "device": "cpu",
        "parallel.tp": 2,
        "parallel.pp": 2,
        "train.iters": 4,
        "train.seq_length": 64,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        "train.lr": 1e-3,
        "train.precision": "fp32",
    }
    base = [f"{k}={v}" for k, v in common.items()]
    plan = {name: ["sft", base + extra] for name, extra in PACKED_SFT_RUNS.items()}
    path = os.pathsep.join([str(EMULATION), os.environ.get("PYTHONPATH", "")])
    results, _ = run_many(4, plan, root, env={"PYTHONPATH": path})
    return {name: [h["loss"] for h in history] for name, history in results.items()}


@pytest.mark.slow
def test_packed_sft_on_the_torch_npu_spec_trains_like_the_local_spec(packed_sft):
    """The whole path: packed rows keep their cu_seqlens through the data loader and the pipeline
    into the varlen attention, at TP=2 x PP=2."""
    local, npu = packed_sft["local"], packed_sft["npu"]
    assert len(local) == 4 and len(set(local)) == 4
    assert npu == pytest.approx(local, abs=1e-5), (local, npu)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sequence_parallelism_trains_like_plain_tensor_parallelism(packed_sft, lora):
    """Sequence parallelism end to end (it needs the NPU spec's norm, so the emulation): split
    activations, sequence-parallel norm gradients and, with LoRA, the adapters' SP paths."""
    suffix = "_lora" if lora else ""
    plain, sp = packed_sft[f"npu{suffix}"], packed_sft[f"sp{suffix}"]
    assert len(set(plain)) == 4
    assert sp == pytest.approx(plain, abs=1e-5), (plain, sp)


BF16_CHECK = """
import torch
from mtrain import accel, parallel
from mtrain.config.kernels import NpuConfig
accel.activate("cpu"); parallel.init(1, 1)
from mtrain.models.provider import BuildOptions, build_model_chunks
from tests.conftest import tiny_spec
spec, tokens = tiny_spec(num_layers=2), torch.randint(0, 500, (2, 16))
def logits(kernels, **switches):
    (m,) = build_model_chunks(spec, BuildOptions(precision="bf16", kernels=kernels,
                                                 npu=NpuConfig(**switches)))
    if kernels != "local":
        m.load_state_dict(reference.state_dict())
    out = m(tokens, torch.arange(16).expand_as(tokens), attention_mask=None)
    assert out.dtype == torch.bfloat16, out.dtype
    return m, out.float()
reference, local = logits("local")
for switches in ({}, {"fused_rmsnorm": False, "fused_swiglu": False, "fused_rope": False}):
    model, out = logits("torch_npu", **switches)
    norms = {p.dtype for n, p in model.named_parameters() if "norm" in n}
    print(switches, (out - local).abs().max().item(), norms)
"""


def test_torch_npu_spec_runs_in_bf16_with_and_without_fused_kernels():
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(EMULATION), str(root)])
    proc = subprocess.run(
        [sys.executable, "-c", BF16_CHECK],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        diff = float(line.split("} ")[1].split()[0])
        assert diff < 0.1, line  # bf16 rounding, not a wrong kernel (which is O(1))
        assert "torch.bfloat16" in line and "float32" not in line, line
