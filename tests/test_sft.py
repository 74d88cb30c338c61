"""SFT end to end: converted tiny model -> mtrain.sft at TP=2 x PP=2 -> mcore2hf -> generate."""

from __future__ import annotations

import itertools
import json

import pytest

from converters import hf2mcore, mcore2hf
from converters.hf2mcore import HF2McoreConfig
from converters.mcore2hf import McoreToHFConfig
from mtrain.models.tiny import write_chat_task
from tests.conftest import TINY
from tests.torchrun import launch

pytestmark = pytest.mark.slow
PAIRS = ["".join(p) for p in itertools.product("abcd", repeat=2)]


def test_tiny_model_learns_to_reverse_strings_and_answers_in_transformers(tiny_hf, tmp_path):
    """Packed (the path most runs take): that padded batches train the same way is shown by
    tests/test_packing.py (packed loss and gradients equal unpacked ones)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = tiny_hf(TINY)
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(tmp_path / "c"), tp=2, pp=2))
    write_chat_task(tmp_path / "reverse.jsonl")
    metrics = tmp_path / "metrics.jsonl"
    launch(
        4,
        "-m",
        "mtrain.sft",
        "+model=qwen3_tiny",
        f"model.hf_dir={hf}",
        f"load={tmp_path / 'c'}",
        f"save={tmp_path / 'sft'}",
        f"data.path={tmp_path / 'reverse.jsonl'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.packing=true",
        "device=cpu",
        "parallel.tp=2",
        "parallel.pp=2",
        "train.iters=150",
        "train.seq_length=64",
        "train.global_batch_size=16",
        "train.micro_batch_size=4",
        "train.lr=3e-3",
        "train.min_lr=3e-4",
        "train.warmup_iters=10",
        "train.precision=fp32",
        "log.interval=25",
        f"log.metrics_file={metrics}",
    )
    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert history[-1]["loss"] < 0.05, [h["loss"] for h in history[::25]]

    out = tmp_path / "hf_sft"
    mcore2hf.convert(
        McoreToHFConfig(ckpt_dir=str(tmp_path / "sft"), out_dir=str(out), hf_dir=str(hf))
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = {}
    for s in PAIRS:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"reverse: {s}"}],
            add_generation_prompt=True,
            return_tensors="pt",
        )
        ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
        generated = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=end)
        answers[s] = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
    assert answers == {s: s[::-1] for s in PAIRS}
