"""Grouped-GEMM experts (moe.grouped_gemm) without MindSpeed: the per-expert names a grouped
model saves and loads, the emulated GMM op against a loop of matmuls, and the refusals.
tests/test_mindspeed.py trains through MindSpeed's GMM itself when MindSpeed is available."""

from __future__ import annotations

import pytest
import torch

from mtrain.config.model import load_preset
from mtrain.config.schema import TrainingCommandConfig, validate
from mtrain.errors import ConfigError
from mtrain.models.experts import group_experts, present_sequential_names
from tests.test_npu_emulation import npu

H, F, E = 6, 5, 3  # hidden, one expert's width (per TP rank), local experts


class Grouped(torch.nn.Module):
    """GroupedMLP's parameters as megatron-core lays them out: weight1 [H, E*2F], weight2
    [E*F, H], expert j's matrices one after the other in memory."""

    def __init__(self):
        super().__init__()
        self.num_local_experts = E
        self.weight1 = torch.nn.Parameter(torch.randn(H, E * 2 * F))
        self.weight2 = torch.nn.Parameter(torch.randn(E * F, H))


def model() -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.mlp = torch.nn.Module()
    layer.mlp.experts = Grouped()
    layer.mlp.router = torch.nn.Linear(H, E * 2, bias=False)
    root = torch.nn.Module()
    root.layers = torch.nn.ModuleList([layer])
    present_sequential_names(root)
    return root


GROUPED = "layers.0.mlp.experts.weight"


def expert_names(j: int) -> tuple[str, str]:
    return (f"layers.0.mlp.experts.local_experts.{j}.linear_fc1.weight",
            f"layers.0.mlp.experts.local_experts.{j}.linear_fc2.weight")  # fmt: skip


def test_a_grouped_model_saves_sequentialmlps_names_and_matrices():
    m = model()
    state = m.state_dict()
    assert GROUPED + "1" not in state and "layers.0.mlp.router.weight" in state
    experts = m.layers[0].mlp.experts
    w1, w2 = experts.weight1.detach(), experts.weight2.detach()
    for j in range(E):
        fc1, fc2 = expert_names(j)
        # what the expert computes: x @ w1[j] (GroupedMLP) == x @ fc1.T (a linear's weight)
        assert torch.equal(state[fc1], w1.view(E, H, 2 * F)[j].t())
        assert torch.equal(state[fc2], w2.view(E, F, H)[j].t())
        assert state[fc1].shape == (2 * F, H) and state[fc1].is_contiguous()
        assert state[fc1.replace(".weight", "._extra_state")] is None
    # the same as the converters' grouped layout, read back
    assert torch.equal(group_experts(state, E)[GROUPED + "1"], w1)


def test_a_grouped_model_loads_per_expert_weights_and_keep_vars_writes_through():
    source, target = model(), model()
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    assert not missing and not unexpected
    got, want = target.layers[0].mlp.experts, source.layers[0].mlp.experts
    assert torch.equal(got.weight1, want.weight1) and torch.equal(got.weight2, want.weight2)
    views = target.state_dict(keep_vars=True)  # what loading HF weights writes into
    fc1, fc2 = expert_names(1)
    views[fc1].copy_(torch.full((2 * F, H), 7.0))
    views[fc2].copy_(torch.full((H, F), 3.0))
    assert (got.weight1.view(E, H, 2 * F)[1] == 7).all()
    assert (got.weight2.view(E, F, H)[1] == 3).all()
    assert (got.weight1.view(E, H, 2 * F)[0] != 7).any()


def test_an_incomplete_expert_set_is_reported_missing():
    state = model().state_dict()
    del state[expert_names(2)[0]]
    missing, _ = model().load_state_dict(state, strict=False)
    assert GROUPED + "1" in missing


@pytest.mark.parametrize("group_list_type", [0, 1])
def test_emulated_gmm_equals_a_matmul_per_group_with_gradients(group_list_type):
    sizes = [3, 0, 4]
    x = torch.randn(sum(sizes), 5, requires_grad=True)
    w = torch.randn(len(sizes), 5, 2, requires_grad=True)
    groups = torch.tensor(sizes if group_list_type else torch.tensor(sizes).cumsum(0).tolist())
    from importlib import import_module

    gmm = import_module(npu.__name__ + "._gmm")
    (y,) = gmm.npu_gmm([x], [w], [], groups, 0, group_list_type)
    want = torch.cat([xe @ we for xe, we in zip(x.split(sizes), w)])
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(y)
    (dx,), (dw,), bias = gmm.npu_gmm_backward([grad], [x], [w], groups, group_list_type)
    want.backward(grad)
    torch.testing.assert_close(dx, x.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dw, w.grad, atol=1e-6, rtol=1e-6)
    assert bias == [] and dw[1].abs().sum() == 0  # the empty group's weight gets no gradient
    with pytest.raises(ValueError, match="do not split the 7 rows"):
        gmm.npu_gmm([x], [w], [], torch.tensor([1, 1, 1]), 0, 1)
    with pytest.raises(NotImplementedError, match="group_type=2"):
        gmm.npu_gmm([x], [w], [], groups, 2, group_list_type)


def moe_config(**top) -> TrainingCommandConfig:
    cfg = TrainingCommandConfig(model=load_preset("qwen3_moe_tiny"))
    cfg.train.iters, cfg.train.seq_length, cfg.data.path = 1, 64, "x.jsonl"
    cfg.moe.grouped_gemm = True
    cfg.parallel.tp, cfg.parallel.ep = 1, 1
    for key, value in top.items():
        setattr(cfg, key, value)
    return cfg


def test_grouped_gemm_with_lora_on_the_mlp_is_refused():
    cfg = moe_config(finetuning_type="lora", load="/ckpt")
    with pytest.raises(ConfigError, match=r"moe.grouped_gemm=true with LoRA on \['linear_fc1'"):
        validate(cfg, world_size=1)
    cfg.lora.target_modules = ["linear_qkv", "linear_proj"]
    validate(cfg, world_size=1)


def test_grouped_gemm_needs_kernels_mindspeed(monkeypatch):
    from mtrain import accel, kernels

    cfg = moe_config(device="cpu", kernels="local")
    plan = validate(cfg, world_size=1)
    monkeypatch.setattr(accel, "activate", lambda *a, **k: pytest.fail("activated"))
    with pytest.raises(ConfigError, match="moe.grouped_gemm=true needs kernels=mindspeed"):
        kernels.start(cfg, plan, cfg.model.spec())


def test_resuming_across_the_grouped_gemm_setting_is_refused_up_front(tiny_hf, tmp_path):
    """The optimizer state follows the parameters, which the setting changes (one grouped
    parameter per layer, or one per expert); a weights-only start is fine either way."""
    import shutil

    from converters import hf2mcore
    from converters.hf2mcore import HF2McoreConfig
    from mtrain.checkpoint import GROUPED_GEMM_ARG, TRACKER, check_start
    from mtrain.checkpoint.layout import load_rank_file, save_rank_file

    hf = tiny_hf(load_preset("qwen3_moe_tiny").spec())
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(tmp_path / "release")))
    save = tmp_path / "save"
    shutil.copytree(tmp_path / "release" / "release", save / "iter_0000004")
    rank = save / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt"
    payload = load_rank_file(rank, mmap=False)
    vars(payload["args"])[GROUPED_GEMM_ARG] = True
    save_rank_file(rank, {**payload, "iteration": 4, "optimizer": {}})
    (save / TRACKER).write_text("4\n")

    def start(grouped: bool) -> None:
        cfg = moe_config(save=str(save))
        cfg.moe.grouped_gemm = grouped
        spec = cfg.model.spec()
        check_start(cfg, spec, validate(cfg, 1, spec))

    start(True)
    with pytest.raises(ConfigError, match=r"trained with moe.grouped_gemm=true; resume with"):
        start(False)
