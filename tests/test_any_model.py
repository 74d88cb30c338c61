"""Any HF model of a supported family trains with `model.hf_dir=` alone: the architecture comes
from its config.json; a preset is an optional shortcut checked against it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from converters import hf2mcore
from converters.hf2mcore import HF2McoreConfig
from mtrain.config.model import ModelConfig, load_preset
from mtrain.errors import ConfigError
from mtrain.models.tiny import write_corpus
from tests.conftest import tiny_spec
from tests.torchrun import launch, torchrun

# Matches no preset: another family, depth, width and vocabulary.
LLAMA = tiny_spec(
    family="llama", num_layers=3, hidden_size=96, ffn_hidden_size=192, num_attention_heads=6,
    num_query_groups=3, kv_channels=16, vocab_size=384, tie_word_embeddings=False,
)  # fmt: skip


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtrain.pt", "dry_run=true", "train.iters=4", "data.path=x", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_hf_dir_alone_gives_the_architecture_name_and_parameter_count(tiny_hf):
    import torch
    from transformers import AutoModelForCausalLM

    hf = tiny_hf(LLAMA)
    spec = ModelConfig(hf_dir=str(hf)).spec()
    assert spec == LLAMA
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    reference = sum(p.numel() for p in model.parameters())
    assert spec.num_parameters() == reference
    proc = dry_run(f"model.hf_dir={hf}", "train.seq_length=64", "parallel.tp=3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"model      {hf.name}: {reference / 1e3:.2f} K parameters")


def test_a_preset_that_contradicts_config_json_lists_every_difference(tiny_hf):
    model = load_preset("qwen3_tiny")
    model.hf_dir = str(tiny_hf(LLAMA))
    with pytest.raises(ConfigError) as err:
        model.spec()
    message = str(err.value)
    for key, preset, actual in [
        ("family", "qwen3", "llama"),
        ("num_layers", 4, 3),
        ("hidden_size", 64, 96),
        ("vocab_size", 512, 384),
        ("tie_word_embeddings", True, False),
    ]:
        assert (
            f"model.{key}={preset} (preset qwen3_tiny) but {model.hf_dir}/config.json has "
            f"{actual}" in message
        )
    assert "leave out +model=" in message


def test_a_single_key_may_be_given_with_hf_dir_when_it_agrees(tiny_hf):
    hf = tiny_hf(LLAMA)
    assert ModelConfig(hf_dir=str(hf), num_layers=3).spec() == LLAMA
    with pytest.raises(ConfigError, match=r"model.num_layers=4 \(given\) but .*config.json has 3"):
        ModelConfig(hf_dir=str(hf), num_layers=4).spec()


@pytest.mark.slow
def test_pretraining_a_model_without_a_preset_and_exporting_hf(tiny_hf, tmp_path):
    """A model no preset matches trains at TP3 from model.hf_dir alone, and checkpoint.save_hf
    writes with every save the HF model mcore2hf writes from that checkpoint, which transformers
    loads."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from converters import mcore2hf
    from converters.mcore2hf import McoreToHFConfig

    hf = tiny_hf(LLAMA)
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(tmp_path / "c"), tp=3))
    write_corpus(tmp_path / "corpus.jsonl", 200)
    metrics, save = tmp_path / "metrics.jsonl", tmp_path / "run"
    launch(
        3, "-m", "mtrain.pt", f"model.hf_dir={hf}", f"load={tmp_path / 'c'}",
        f"data.path={tmp_path / 'corpus.jsonl'}", f"data.cache_dir={tmp_path / 'cache'}",
        "train.iters=3", "train.seq_length=32", "train.global_batch_size=2",
        "train.precision=fp32", "parallel.tp=3", "device=cpu", f"log.metrics_file={metrics}",
        f"save={save}", "checkpoint.save_interval=2", "checkpoint.save_hf=true",
        "checkpoint.save_hf_every_save=true", "checkpoint.save_hf_dtype=bf16",
    )  # fmt: skip
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(losses) == 3 and all(5.0 < loss < 7.0 for loss in losses), losses

    for iteration in (2, 3):
        exported = save / f"iter_{iteration:07d}" / "hf"
        converted = tmp_path / f"converted{iteration}"
        mcore2hf.convert(
            McoreToHFConfig(
                ckpt_dir=str(save), out_dir=str(converted), hf_dir=str(hf),
                iteration=str(iteration), dtype="bf16",
            )
        )  # fmt: skip
        assert sorted(p.name for p in exported.iterdir()) == sorted(
            p.name for p in converted.iterdir()
        )
        ours, theirs = (
            load_file(exported / "model.safetensors"),
            load_file(converted / "model.safetensors"),
        )
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert all(t.dtype == torch.bfloat16 for t in ours.values())
    model = AutoModelForCausalLM.from_pretrained(exported)  # strict: every weight is there
    assert model.config.num_hidden_layers == LLAMA.num_layers
    config = json.loads((exported / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"


@pytest.mark.slow
def test_training_straight_from_hf_weights_equals_converting_first(tiny_hf, tmp_path):
    """load=HF_DIR at TP2 x PP2: every rank reads its own slices; the loss curve is the one of
    a run from the converted checkpoint, exactly (fp32, same data and seed)."""
    from tests.conftest import TINY

    hf = tiny_hf(TINY)
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(tmp_path / "c"), tp=2, pp=2))
    write_corpus(tmp_path / "corpus.jsonl", 200)

    def losses(load, name):
        metrics = tmp_path / f"{name}.jsonl"
        launch(
            4, "-m", "mtrain.pt", f"model.hf_dir={hf}", f"load={load}",
            f"data.path={tmp_path / 'corpus.jsonl'}", f"data.cache_dir={tmp_path / 'cache'}",
            "train.iters=3", "train.seq_length=32", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.precision=fp32", "parallel.tp=2",
            "parallel.pp=2", "device=cpu", f"log.metrics_file={metrics}",
        )  # fmt: skip
        return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]

    direct = losses(hf, "direct")
    assert direct == losses(tmp_path / "c", "converted") and len(direct) == 3


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec, precision",
    [
        (tiny_spec(), "bf16"),  # tied: the last stage's output layer is read from the embedding
        (tiny_spec(family="qwen2", tie_word_embeddings=False, vocab_size=509), "fp32"),
    ],
    ids=["qwen3-tied-bf16", "qwen2-bias-untied-oddvocab-fp32"],
)
def test_hf_weights_read_into_an_uninitialised_model_equal_the_converted_ones(
    tiny_hf, tmp_path, spec, precision
):
    """At TP2 x PP2 every parameter of a model built without initialisation (and set to NaN)
    gets exactly the value the converted checkpoint gives a normally initialised one."""
    hf = tiny_hf(spec)
    ckpt = tmp_path / "c"
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(ckpt), tp=2, pp=2))
    result = tmp_path / "result.json"
    torchrun("hf_load_parity.py", 4, result, hf, ckpt, "2", "2", precision)
    rows = json.loads(result.read_text())
    assert [r["differ"] for r in rows] == [[]] * 4 and all(r["tensors"] for r in rows)
