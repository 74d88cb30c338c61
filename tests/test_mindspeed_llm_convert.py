"""MindSpeed-LLM's own converter, `convert_ckpt_v2.py`, and mtrain's read each other's output:
a tiny Qwen3 at TP2 PP2, exact to the bit (converters.compare, tolerance zero).

Needs a checkout of the public repository Ascend/MindSpeed-LLM (not on PyPI, so not in CI):

    MTRAIN_MINDSPEED_LLM_SRC=/path/to/MindSpeed-LLM python -m pytest tests/test_mindspeed_llm_convert.py

The conversion code (mindspeed_llm/tasks/checkpoint) needs only torch, numpy, safetensors and
tqdm, but the script's imports reach MindSpeed-LLM's training stack: `import mindspeed_llm` loads
MindSpeed's megatron adaptor (torch_npu, MindSpeed) when TRAINING_BACKEND is "mcore" (the
default), and `mindspeed_llm.training.utils`, imported for its `auto_coverage` decorator alone,
imports CANN's `acl`, torch_npu, Megatron-LM's `megatron.training` and MindSpeed. Where that
chain imports (an NPU machine set up for MindSpeed-LLM) the script runs as it is. Elsewhere it
runs past the chain: TRAINING_BACKEND=none and a `mindspeed_llm.training.utils` holding only
`auto_coverage` (which merely turns coverage on under START_COVERAGE=true); every line of the
conversion is still MindSpeed-LLM's. A module still missing after that is named in the skip
reason. (tests/npu_emulation's torch_npu does not help: MindSpeed, `acl` and Megatron-LM remain.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from converters import hf2mcore, mcore2hf
from converters.compare import compare
from converters.hf2mcore import HF2McoreConfig
from converters.mcore2hf import McoreToHFConfig
from mtrain.checkpoint import MegatronCheckpoint, load_rank_file
from tests.conftest import TINY

pytestmark = pytest.mark.slow  # a probe and two runs of its converter, each its own process

SRC_VAR = "MTRAIN_MINDSPEED_LLM_SRC"
TRAINING_CHAIN = "mindspeed_llm.training.utils"

# `python -c PAST_TRAINING_CHAIN convert_ckpt_v2.py ARGS...`: the script, past the chain above.
PAST_TRAINING_CHAIN = f"""
import os, runpy, sys, types
os.environ["TRAINING_BACKEND"] = "none"  # mindspeed_llm/__init__.py: no MindSpeed adaptor
utils = types.ModuleType("{TRAINING_CHAIN}")
utils.auto_coverage = lambda main: main
sys.modules[utils.__name__] = utils
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class MindSpeedLLM:
    """Runs `convert_ckpt_v2.py` of one checkout in its own process: as it is where its training
    stack imports, else past it (`why_bypassed` then says what stopped that import)."""

    def __init__(self, src: Path):
        self.src = src
        self.env = {**os.environ, "PYTHONPATH": str(src)}  # its packages, not mtrain's
        probe = self._python(["-c", f"import {TRAINING_CHAIN}"])
        lines = probe.stderr.strip().splitlines() or ["(no output)"]
        self.why_bypassed = None if probe.returncode == 0 else lines[-1]

    def convert(self, *args: str) -> None:
        script = str(self.src / "convert_ckpt_v2.py")
        head = [script] if self.why_bypassed is None else ["-c", PAST_TRAINING_CHAIN, script]
        done = self._python([*head, *args])
        if done.returncode == 0:
            return
        missing = re.findall(r"ModuleNotFoundError: No module named '([\w.]+)'", done.stderr)
        if missing:
            reason = (
                f"MindSpeed-LLM's convert_ckpt_v2.py cannot run here: no module {missing[-1]!r}"
            )
            if self.why_bypassed:
                reason += f" (even past its training stack, which failed with {self.why_bypassed})"
            pytest.skip(reason)
        pytest.fail(f"convert_ckpt_v2.py {' '.join(args)} failed:\n{done.stderr[-3000:]}")

    def _python(self, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *argv], cwd=self.src, env=self.env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip


@pytest.fixture(scope="module")
def msllm() -> MindSpeedLLM:
    src = os.environ.get(SRC_VAR)
    if not src:
        pytest.skip(
            f"{SRC_VAR} is not set: point it at a checkout of github.com/Ascend/MindSpeed-LLM "
            "to run its convert_ckpt_v2.py against mtrain's converters"
        )
    if not (Path(src) / "convert_ckpt_v2.py").is_file():
        pytest.skip(f"{SRC_VAR}={src} has no convert_ckpt_v2.py; is it a MindSpeed-LLM checkout?")
    return MindSpeedLLM(Path(src))


@pytest.fixture(scope="module")
def hf(tiny_hf, tmp_path_factory) -> Path:
    """The tiny Qwen3 with its rope_theta also at the top of config.json, as the hub's Qwen3
    configs have it (saved by transformers 4.5x). transformers 5 keeps it only inside
    rope_parameters, a dict, and MindSpeed-LLM's hf2mg stores only scalar and list config
    values in `args`: it would record no rotary base at all."""
    out = tmp_path_factory.mktemp("msllm") / "hf"
    shutil.copytree(tiny_hf(TINY), out)
    config = json.loads((out / "config.json").read_text())
    config["rope_theta"] = TINY.rope_theta
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def its_checkpoint(msllm, hf) -> Path:
    out = hf.parent / "its_mg"
    msllm.convert(
        "--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "qwen3",
        "--load-dir", str(hf), "--save-dir", str(out),
        "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def mtrain_checkpoint(hf) -> Path:
    out = hf.parent / "mtrain_mg"
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(out), tp=2, pp=2, iteration="1"))
    return out


def test_its_hf2mg_checkpoint_opens_in_mtrain_with_the_model_and_layout(its_checkpoint):
    ckpt = MegatronCheckpoint.open(its_checkpoint)  # protocol 4, `model` a defaultdict
    # its args mix Megatron-LM names with config.json's (intermediate_size, num_key_value_heads)
    assert ckpt.spec == TINY
    assert (ckpt.iter_dir.name, ckpt.tp, ckpt.pp, ckpt.vpp) == ("iter_0000001", 2, 2, 1)


def test_its_rank_files_hold_mtrain_s_tensors_bit_for_bit(its_checkpoint, mtrain_checkpoint):
    theirs = MegatronCheckpoint.open(its_checkpoint)
    ours = MegatronCheckpoint.open(mtrain_checkpoint)
    for pp_rank in range(2):
        for tp_rank in range(2):
            a = load_rank_file(theirs.rank_file(tp_rank, pp_rank), mmap=False)["model"]
            b = load_rank_file(ours.rank_file(tp_rank, pp_rank), mmap=False)["model"]
            assert sorted(a) == sorted(b), (tp_rank, pp_rank)
            unequal = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
            assert unequal == [], (tp_rank, pp_rank)


def test_its_hf2mg_checkpoint_exports_to_hf_bit_identical(its_checkpoint, hf):
    out = hf.parent / "via_mtrain_hf"
    mcore2hf.convert(
        McoreToHFConfig(ckpt_dir=str(its_checkpoint), out_dir=str(out), hf_dir=str(hf))
    )
    assert compare(str(hf), str(out)) == []


def test_its_mg2hf_exports_mtrain_s_checkpoint_bit_identical(msllm, mtrain_checkpoint, hf):
    out = hf.parent / "via_its_hf"
    msllm.convert(
        "--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", "qwen3",
        "--load-dir", str(mtrain_checkpoint), "--save-dir", str(out), "--hf-cfg-dir", str(hf),
    )  # fmt: skip
    assert compare(str(hf), str(out)) == []
