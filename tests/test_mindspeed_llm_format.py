"""Checkpoints as MindSpeed-LLM writes them open in mtrain: pickle protocol 4, Megatron-LM's
argument names only (no mtrain keys), numpy RNG state, optimizer state, a numbered tracker.
The files are built here (MindSpeed-LLM's code is not used); the layout follows what its
convert_ckpt_v2 and its trainer save."""

from __future__ import annotations

import argparse
import json
import random
import shutil

import numpy as np
import pytest
import torch

from converters import hf2mcore, mcore2hf
from converters.compare import compare
from converters.hf2mcore import HF2McoreConfig
from converters.mcore2hf import McoreToHFConfig
from mtrain.checkpoint import TRACKER, MegatronCheckpoint, check_start, load_rank_file
from mtrain.checkpoint.args import spec_from_megatron_args
from mtrain.config.model import ModelConfig
from mtrain.config.schema import TrainingCommandConfig, validate
from tests.conftest import TINY

# Keys mtrain writes that Megatron-LM / MindSpeed-LLM do not.
MTRAIN_ONLY = ("model_type_hf",)


def mindspeed_llm_style(ckpt_dir, out_dir, iteration: int = 10) -> None:
    """Rewrite an hf2mcore checkpoint the way MindSpeed-LLM's trainer saves one."""
    src = MegatronCheckpoint.open(ckpt_dir)
    for pp_rank in range(src.pp):
        for tp_rank in range(src.tp):
            path = src.rank_file(tp_rank, pp_rank)
            payload = load_rank_file(path, mmap=False)
            args = {k: v for k, v in vars(payload["args"]).items() if k not in MTRAIN_ONLY}
            args.update(params_dtype=torch.float32, iteration=iteration, consumed_train_samples=80)
            model = payload["model"]
            saved = {
                "args": argparse.Namespace(**args),
                "checkpoint_version": 3.0,
                "iteration": iteration,
                "model": model,
                "optimizer": {
                    "optimizer": {
                        "state": {
                            i: {"exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
                            for i, t in enumerate(model.values())
                        },
                        "param_groups": [{"lr": 1e-5, "params": list(range(len(model)))}],
                    },
                    "fp32_from_fp16_params": [],
                },
                "opt_param_scheduler": {"num_steps": 80, "max_lr": 1e-5},
                "rng_state": [
                    {
                        "random_rng_state": random.getstate(),
                        "np_rng_state": np.random.get_state(),
                        "torch_rng_state": torch.get_rng_state(),
                        "cuda_rng_state": torch.get_rng_state(),
                        "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
                    }
                ],
            }
            target = out_dir / f"iter_{iteration:07d}" / path.parent.name / path.name
            target.parent.mkdir(parents=True)
            torch.save(saved, target, pickle_protocol=4)
    (out_dir / TRACKER).write_text(f"{iteration}\n")


@pytest.fixture(scope="module")
def written(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("msllm")
    hf = tiny_hf(TINY)
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(root / "c"), tp=2, pp=2))
    mindspeed_llm_style(root / "c", root / "msllm")
    return root, hf


def test_torch_alone_cannot_read_a_protocol_4_file(written):
    root, _ = written
    path = next((root / "msllm").rglob("model_optim_rng.pt"))
    with pytest.raises(Exception, match="Unsupported operand|Weights only load failed"):
        torch.load(path, weights_only=True)


def test_its_checkpoint_opens_with_the_model_and_layout(written):
    root, _ = written
    ckpt = MegatronCheckpoint.open(root / "msllm")
    assert ckpt.spec == TINY  # the family inferred from its switches (q/k norms: Qwen3)
    assert (ckpt.tp, ckpt.pp, ckpt.has_optimizer) == (2, 2, True)


def test_it_exports_to_hf_bit_identical(written, tmp_path):
    root, hf = written
    out = tmp_path / "hf"
    mcore2hf.convert(
        McoreToHFConfig(ckpt_dir=str(root / "msllm"), out_dir=str(out), hf_dir=str(hf))
    )
    assert compare(str(hf), str(out)) == []


def test_it_is_accepted_as_a_fine_tuning_start(written, tmp_path):
    root, hf = written
    cfg = TrainingCommandConfig(model=ModelConfig(hf_dir=str(hf)))
    cfg.train.iters, cfg.train.seq_length, cfg.data.path = 10, 64, "x.jsonl"
    cfg.parallel.tp = cfg.parallel.pp = 2
    cfg.load, cfg.checkpoint.finetune = str(root / "msllm"), True
    spec = cfg.model.spec()
    check_start(cfg, spec, validate(cfg, 4, spec))
    # and a run saving into a copy of it would resume it (it has optimizer state)
    shutil.copytree(root / "msllm", tmp_path / "resume")
    cfg.save, cfg.load, cfg.checkpoint.finetune = str(tmp_path / "resume"), None, False
    check_start(cfg, spec, validate(cfg, 4, spec))


def test_its_hf2mg_args_give_the_model(written):
    """MindSpeed-LLM's hf2mg (convert_ckpt_v2) stores config.json's keys plus some of
    Megatron-LM's: no ffn_hidden_size or num_query_groups, group_query_attention=False even for
    GQA, kv_channels from head_dim, rotary_base from a top-level rope_theta."""
    args = argparse.Namespace(
        **json.loads((written[1] / "config.json").read_text()),
        tensor_model_parallel_size=2, pipeline_model_parallel_size=2, num_layers=TINY.num_layers,
        kv_channels=TINY.kv_channels, rotary_base=TINY.rope_theta, norm_epsilon=TINY.norm_epsilon,
        untie_embeddings_and_output_weights=False, group_query_attention=False, qk_layernorm=True,
    )  # fmt: skip
    assert spec_from_megatron_args(args, "its args") == TINY


def test_mtrain_args_hold_the_names_its_mg2hf_reads(written):
    """Its mg2hf takes the GQA groups from `num_key_value_heads` (config.json's name) and needs
    `expert_model_parallel_size`."""
    args = MegatronCheckpoint.open(written[0] / "c").args
    assert (args.num_key_value_heads, args.expert_model_parallel_size) == (TINY.num_query_groups, 1)
