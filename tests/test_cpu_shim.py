"""The CPU shim (mtrain.accel.cpu) sends megatron's CUDA calls to the CPU and changes nothing else.

The shim patches torch for the whole process and cannot be undone, so the checks run in one
fresh interpreter: "before" really is before the shim, and the rest of the test session never
sees it. The multi-process megatron training runs that exercise the shim end to end live with
the torchrun tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys, tempfile
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

config = Qwen3Config(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
    rope_theta=1e6, tie_word_embeddings=True,
)
ids = torch.arange(12).view(1, 12)
ckpt = tempfile.mkdtemp()

def logits():
    torch.manual_seed(0)
    built = Qwen3ForCausalLM(config).eval()
    loaded = Qwen3ForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        return built(ids).logits, loaded(ids).logits, loaded.model.rotary_emb.inv_freq.clone()

torch.manual_seed(0)
Qwen3ForCausalLM(config).save_pretrained(ckpt)
built0, loaded0, inv_freq0 = logits()

# Forget what the "before" run cached, as in a process that installs the shim first thing.
from torch._dynamo.trace_rules import get_torch_obj_rule_map
from torch.utils._device import _device_constructors
_device_constructors.cache_clear()
get_torch_obj_rule_map.cache_clear()

from mtrain.accel import cpu
cpu.install_shim()
cpu.install_shim()  # idempotent
built1, loaded1, inv_freq1 = logits()

from megatron.core.tensor_parallel import random as mrandom

out = {
    "built_equal": torch.equal(built0, built1),
    "loaded_equal": torch.equal(loaded0, loaded1),
    "loaded_matches_built": torch.equal(built1, loaded1),
    "inv_freq_equal": torch.equal(inv_freq0, inv_freq1),
    "cuda_available": torch.cuda.is_available(),
    "devices": [
        torch.empty(3, device="cuda").device.type,
        torch.zeros(2, device=torch.cuda.current_device()).device.type,
        torch.tensor([1.0], device=torch.device("cuda", 0)).device.type,
        torch.ones(1).cuda().device.type,
        torch.ones(1).to(0).device.type,
        torch.ones(1).to(device="cuda:0").device.type,
    ],
}
with torch.device("meta"):
    out["meta_context"] = [torch.empty(2).device.type, torch.tensor([1.0]).device.type]

@torch.jit.script
def scripted(n: int):
    return torch.zeros(n) + torch.arange(n)
out["torchscript"] = scripted(3).tolist()

# megatron's jit_fuser is torch.compile; dynamo indexes torch.* (torch.cuda too) by name when
# first imported and refuses one object under two names with different rules.
out["dynamo_rules"] = len(get_torch_obj_rule_map()) > 0
compiled = torch.compile(
    lambda x: torch.nn.functional.dropout(x, 0.5, training=False) + torch.zeros(3, device="cuda"),
    backend="eager", fullgraph=True,
)
out["dynamo"] = compiled(torch.ones(3)).tolist()

out["type_elsewhere"] = torch.ones(1).type()
megatron_frame = {"__name__": "megatron.core.optimizer.clip_grads", "torch": torch}
out["type_in_megatron"] = eval("torch.ones(1).type()", megatron_frame)

torch.cuda.manual_seed(7)
a = torch.rand(4)
torch.manual_seed(7)
out["cuda_seed_is_cpu_seed"] = torch.equal(a, torch.rand(4))

state = mrandom._get_cuda_rng_state()
first = torch.rand(4)
mrandom._set_cuda_rng_state(state)
out["set_rng_state_applies"] = torch.equal(first, torch.rand(4))

tracker = mrandom.CudaRNGStatesTracker()
tracker.add("tp", 1234)
before = torch.get_rng_state()
with tracker.fork("tp"):
    x = torch.rand(4)
with tracker.fork("tp"):
    y = torch.rand(4)
stream = torch.Generator().manual_seed(1234)
out["fork_restores_outer_state"] = torch.equal(before, torch.get_rng_state())
out["fork_continues_its_stream"] = torch.equal(torch.cat([x, y]), torch.rand(8, generator=stream))

print("PROBE" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    script = tmp_path_factory.mktemp("cpu_shim") / "probe.py"  # TorchScript needs a source file
    script.write_text(PROBE)
    run = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("PROBE"))
    return json.loads(line[len("PROBE") :])


def test_transformers_qwen3_logits_are_identical_before_and_after_shim(probe):
    assert probe["built_equal"]
    assert probe["loaded_equal"]


def test_from_pretrained_rope_buffers_are_initialised_after_shim(probe):
    # The old pitfall: uninitialised rotary_emb.inv_freq after from_pretrained.
    assert probe["inv_freq_equal"]
    assert probe["loaded_matches_built"]


def test_cuda_devices_land_on_cpu(probe):
    assert probe["devices"] == ["cpu"] * 6


def test_shim_keeps_cuda_unavailable_and_device_contexts_working(probe):
    assert probe["cuda_available"] is False
    assert probe["meta_context"] == ["meta", "meta"]
    assert probe["torchscript"] == [0.0, 1.0, 2.0]
    assert probe["dynamo_rules"]
    assert probe["dynamo"] == [1.0, 1.0, 1.0]


def test_tensor_type_reports_cuda_names_only_to_megatron(probe):
    assert probe["type_elsewhere"] == "torch.FloatTensor"
    assert probe["type_in_megatron"] == "torch.cuda.FloatTensor"


def test_cuda_rng_is_the_cpu_generator(probe):
    assert probe["cuda_seed_is_cpu_seed"]
    assert probe["set_rng_state_applies"]


def test_rng_tracker_fork_uses_its_own_stream_and_restores_the_default(probe):
    assert probe["fork_restores_outer_state"]
    assert probe["fork_continues_its_stream"]
