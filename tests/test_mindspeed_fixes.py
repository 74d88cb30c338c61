"""What MindSpeed does to a process, and mtrain not being fooled by it; no MindSpeed needed.

Each MindSpeed behaviour is imitated the way branch 2.3.0_core_r0.12.1 does it (seen when
tests/test_mindspeed.py runs the real one): dummy `transformer_engine` modules with a loader-less
spec, `importlib.metadata.version` reporting transformer-engine 2.2.0, a `torch.compile` no-op,
a `Tensor.type` wrapper, a norm factory that forces `use_fused_rmsnorm` on.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mtrain import accel, kernels
from mtrain.env import package_version
from mtrain.errors import ConfigError
from mtrain.kernels import mindspeed

ROOT = Path(__file__).resolve().parent.parent


def test_a_dummy_module_with_a_loaderless_spec_is_not_an_installed_package(monkeypatch):
    dummy = types.ModuleType("transformer_engine")
    dummy.__spec__ = ModuleSpec("transformer_engine", None)  # MindSpeed's patch_utils does this
    monkeypatch.setitem(sys.modules, "transformer_engine", dummy)
    assert not accel.installed("transformer_engine")
    unspecced = types.ModuleType("transformer_engine")
    unspecced.__spec__ = None
    monkeypatch.setitem(sys.modules, "transformer_engine", unspecced)
    assert not accel.installed("transformer_engine")
    assert accel.installed("torch")
    assert accel.installed("megatron")  # a namespace package: no loader, but search locations


def test_te_kernels_are_refused_when_only_a_dummy_transformer_engine_is_loaded(monkeypatch):
    dummy = types.ModuleType("transformer_engine")
    dummy.__spec__ = ModuleSpec("transformer_engine", None)
    monkeypatch.setitem(sys.modules, "transformer_engine", dummy)
    with pytest.raises(ConfigError, match="kernels=te needs"):
        kernels.resolve_kernels("te", "cuda")


@pytest.mark.skipif(accel.installed("transformer_engine"), reason="TE really installed")
def test_env_reads_versions_from_metadata_not_from_a_wrapped_version_function(monkeypatch):
    real = importlib.metadata.version

    def mindspeed_version(name, *args, **kwargs):
        return "2.2.0" if name == "transformer-engine" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.metadata, "version", mindspeed_version)
    assert package_version("transformer-engine") is None
    assert package_version("torch") is not None


def fake_mindspeed(root: Path, release: str) -> Path:
    """A `mindspeed` package directory holding the marker files of `release` and older."""
    package = root / "mindspeed"
    names = [name for name, _ in mindspeed.RELEASE_MARKERS]
    for name, marker in mindspeed.RELEASE_MARKERS:
        if release in names and names.index(name) >= names.index(release):
            (package / marker).parent.mkdir(parents=True, exist_ok=True)
            (package / marker).write_text("")
    package.mkdir(parents=True, exist_ok=True)
    return package


@pytest.mark.parametrize("release", ["26.1.0", "26.0.0", "2.3.0", "2.2.0", "2.1.0 or older"])
def test_the_mindspeed_release_is_told_by_the_files_it_contains(tmp_path, release):
    assert mindspeed.release(fake_mindspeed(tmp_path, release)) == release


def test_no_mindspeed_on_the_path_has_no_release():
    assert mindspeed.release() is None


def test_the_header_says_mindspeed_disabled_torch_compile(monkeypatch):
    def dummy_compile(fn=None, *args, **kwargs):
        return fn

    dummy_compile.__module__ = "mindspeed.core.megatron_basic.requirements_basic"
    assert not mindspeed.compile_disabled()
    monkeypatch.setattr(torch, "compile", dummy_compile)
    assert mindspeed.compile_disabled()
    assert "torch.compile / torch.jit.script no-ops" in kernels.describe("mindspeed")
    assert kernels.describe("local") == "local"


def ops(**changes) -> SimpleNamespace:
    fields = dict(flash_attn=True, fused_rmsnorm=True, fused_swiglu=True, fused_rope=True)
    return SimpleNamespace(**{**fields, **changes})


def test_fused_swiglu_false_turns_off_the_fusion_mindspeed_would_redirect():
    assert kernels.megatron_fusions("mindspeed", ops())["bias_activation_fusion"]
    assert not kernels.megatron_fusions("mindspeed", ops(fused_swiglu=False))[
        "bias_activation_fusion"
    ]
    assert kernels.megatron_fusions("sdpa", ops(fused_swiglu=False))["bias_activation_fusion"]


class _ForcedFusedNorm(torch.nn.Module):
    """Like MindSpeed's RMSNorm: its factory sets `use_fused_rmsnorm = True` on the config."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        config.use_fused_rmsnorm = True

    def unfused_rmsnorm(self, x):
        return x


_ForcedFusedNorm.__module__ = "mindspeed.core.fusions.fused_rms_norm"


@pytest.mark.parametrize("fused", [True, False])
def test_fused_rmsnorm_false_is_honoured_on_mindspeeds_norms(fused):
    config = SimpleNamespace(use_fused_rmsnorm=False)
    chunk = torch.nn.Sequential(_ForcedFusedNorm(config), _ForcedFusedNorm(config))
    mindspeed.prepare(chunk, ops(fused_rmsnorm=fused), packed=True)
    assert config.use_fused_rmsnorm is fused


def test_without_flash_attention_causal_batches_get_the_full_causal_mask(monkeypatch):
    monkeypatch.setattr(accel, "device", lambda: torch.device("cpu"))
    seen = {}

    class Model(torch.nn.Module):
        def forward(self, tokens, positions, attention_mask=None):
            seen["mask"] = attention_mask
            return tokens

    model = Model()
    mindspeed.prepare(model, ops(flash_attn=False), packed=False)
    model(torch.zeros(2, 5, dtype=torch.long), torch.arange(5)[None])
    expected = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)[None, None]
    assert torch.equal(seen["mask"], expected)


def test_the_cpu_test_switch_is_refused_without_the_torch_npu_emulation(monkeypatch):
    monkeypatch.delenv(mindspeed.CPU_TEST_SWITCH, raising=False)
    assert not mindspeed.emulated_on_cpu("cpu")
    with pytest.raises(ConfigError, match="kernels=mindspeed needs device=npu"):
        kernels.resolve_kernels("mindspeed", "cpu")
    monkeypatch.setenv(mindspeed.CPU_TEST_SWITCH, "1")
    for device in ("cpu", "cuda"):
        with pytest.raises(ConfigError, match="for mtrain's own tests only"):
            mindspeed.emulated_on_cpu(device)
    with pytest.raises(ConfigError, match="for mtrain's own tests only"):
        kernels.resolve_kernels("mindspeed", "cpu")


SHIM_AFTER_A_TYPE_WRAPPER = """
import functools, torch
from mtrain.accel import cpu

def wrap_type():  # as MindSpeed's adaptor does, on Tensor and on Parameter
    for cls in (torch.Tensor, torch.nn.Parameter):
        original = cls.type
        cls.type = functools.wraps(original)(lambda *a, _f=original, **k: _f(*a, **k))

cpu.install_shim(before_megatron=wrap_type)
p = torch.nn.Parameter(torch.zeros(1))
scope = {"__name__": "megatron.core.optimizer.optimizer", "p": p}
exec("print(p.type(), p.data.type())", scope)
print(p.type())
"""


def test_the_cpu_shim_still_names_cuda_types_for_megatron_after_another_type_wrapper():
    proc = subprocess.run(
        [sys.executable, "-c", SHIM_AFTER_A_TYPE_WRAPPER],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        "torch.cuda.FloatTensor torch.cuda.FloatTensor",
        "torch.FloatTensor",
    ]
