"""hf2mcore and mcore2hf: exact round trips, the on-disk format, and refusal of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters import hf2mcore, mcore2hf
from converters.hf2mcore import HF2McoreConfig
from converters.mcore2hf import McoreToHFConfig
from mtrain.checkpoint import load_rank_file
from mtrain.errors import CheckpointError, ConfigError
from tests.conftest import tiny_spec

MODELS = {
    "qwen3-tied": tiny_spec(),
    "qwen3-untied-oddvocab": tiny_spec(tie_word_embeddings=False, vocab_size=509),
    "qwen2-bias-tied": tiny_spec(family="qwen2", vocab_size=509),
    "qwen2-bias-untied": tiny_spec(family="qwen2", tie_word_embeddings=False),
    "llama-untied": tiny_spec(family="llama", tie_word_embeddings=False, kv_channels=16),
}


def hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def roundtrip(hf: Path, tmp: Path, tp: int, pp: int, **kw) -> Path:
    ckpt, out = tmp / f"ckpt_tp{tp}pp{pp}", tmp / f"hf_tp{tp}pp{pp}"
    hf2mcore.convert(
        HF2McoreConfig(hf_dir=str(hf), out_dir=str(ckpt), tp=tp, pp=pp, vpp=kw.pop("vpp", 1))
    )
    mcore2hf.convert(McoreToHFConfig(ckpt_dir=str(ckpt), out_dir=str(out), hf_dir=str(hf), **kw))
    return out


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("model", MODELS, ids=str)
def test_roundtrip_is_bit_exact(tiny_hf, tmp_path, model, tp, pp):
    hf = tiny_hf(MODELS[model])
    out = roundtrip(hf, tmp_path, tp, pp)
    assert_bit_identical(hf_tensors(hf), hf_tensors(out))


def test_roundtrip_with_virtual_pipeline_is_bit_exact(tiny_hf, tmp_path):
    hf = tiny_hf(MODELS["qwen3-untied-oddvocab"])
    out = roundtrip(hf, tmp_path, 2, 2, vpp=2)
    assert_bit_identical(hf_tensors(hf), hf_tensors(out))


def test_megatron_layout_on_disk(tiny_hf, tmp_path):
    """Names, local layer indices, args and the tied copy on the last stage (DESIGN.md 3)."""
    hf = tiny_hf(MODELS["qwen3-tied"])
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(tmp_path / "c"), tp=2, pp=2))
    root = tmp_path / "c"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    first = load_rank_file(root / "release/mp_rank_01_000/model_optim_rng.pt")
    last = load_rank_file(root / "release/mp_rank_01_001/model_optim_rng.pt")
    assert first["checkpoint_version"] == 3.0
    args = first["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert (args.num_layers, args.num_query_groups, args.kv_channels) == (4, 2, 32)
    assert args.untie_embeddings_and_output_weights is False
    assert args.padded_vocab_size == 512 and args.transformer_impl == "local"
    assert sorted(k for k in first["model"] if "layers" in k)[0].startswith("decoder.layers.0.")
    assert "decoder.layers.2.input_layernorm.weight" not in last["model"]  # local indices
    assert "embedding.word_embeddings.weight" in first["model"]
    assert "embedding.word_embeddings.weight" not in last["model"]
    assert torch.equal(
        last["model"]["output_layer.weight"], first["model"]["embedding.word_embeddings.weight"]
    )
    qkv = first["model"]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert tuple(qkv.shape) == ((4 // 2 + 2) * 32 * 2 // 2, 64)


def test_rank_files_hold_only_their_own_bytes(tiny_hf, tmp_path):
    """Each tensor owns a storage of exactly its size: no other rank's data rides along."""
    hf = tiny_hf(MODELS["qwen2-bias-untied"])
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(tmp_path / "c"), tp=2, pp=2))
    total = 0
    for path in sorted((tmp_path / "c" / "release").glob("*/model_optim_rng.pt")):
        for name, t in load_rank_file(path)["model"].items():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (path, name)
            total += t.numel() * t.element_size()
    nbytes = {n: t.numel() * t.element_size() for n, t in hf_tensors(hf).items()}
    replicated = sum(b for n, b in nbytes.items() if "norm" in n)  # stored once per TP rank
    assert total == sum(nbytes.values()) + (2 - 1) * replicated  # vocab 512: no padding


def test_uneven_dtypes_survive_the_roundtrip(tiny_hf, tmp_path):
    hf = tiny_hf(MODELS["qwen3-untied-oddvocab"], shard=None)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in hf.iterdir():
        if f.suffix != ".safetensors":
            (mixed / f.name).write_bytes(f.read_bytes())
    tensors = {n: (t if "norm" in n else t.bfloat16()) for n, t in hf_tensors(hf).items()}
    save_file(tensors, str(mixed / "model.safetensors"))
    out = roundtrip(mixed, tmp_path, 2, 2)
    assert_bit_identical(tensors, hf_tensors(out))


def test_dtype_option_casts_every_tensor(tiny_hf, tmp_path):
    hf = tiny_hf(MODELS["qwen3-tied"])
    out = roundtrip(hf, tmp_path, 2, 1, dtype="bf16")
    expected = {n: t.bfloat16() for n, t in hf_tensors(hf).items()}
    assert_bit_identical(expected, hf_tensors(out))
    assert json.loads((out / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"


def test_sharded_output_has_an_index_and_loads_in_transformers(tiny_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = tiny_hf(MODELS["qwen2-bias-untied"])
    out = roundtrip(hf, tmp_path, 2, 2, max_shard_size_gb=60e3 / 1e9)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == sorted(p.name for p in out.glob("*.safetensors"))
    for f in files:  # at most the limit, unless one tensor alone is larger (as in HF)
        sizes = [t.numel() * t.element_size() for t in load_file(out / f).values()]
        assert sum(sizes) <= 60e3 or len(sizes) == 1, f
    a = AutoModelForCausalLM.from_pretrained(hf).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_is_written_from_args_without_hf_dir(tiny_hf, tmp_path):
    from transformers import AutoConfig

    hf = tiny_hf(MODELS["qwen2-bias-tied"])
    ckpt, out = tmp_path / "c", tmp_path / "o"
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(hf), out_dir=str(ckpt), tp=2, pp=2))
    mcore2hf.convert(McoreToHFConfig(ckpt_dir=str(ckpt), out_dir=str(out)))
    ours, theirs = AutoConfig.from_pretrained(out), AutoConfig.from_pretrained(hf)
    for key in (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "tie_word_embeddings",
        "intermediate_size",
    ):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert_bit_identical(hf_tensors(hf), hf_tensors(out))


# --- bad input ---------------------------------------------------------------------------------


def test_tp_must_divide_kv_groups(tiny_hf, tmp_path):
    with pytest.raises(ConfigError, match=r"tp=4 must divide num_query_groups=2"):
        hf2mcore.convert(HF2McoreConfig(hf_dir=str(tiny_hf()), out_dir=str(tmp_path / "o"), tp=4))


def test_pp_must_divide_layers(tiny_hf, tmp_path):
    with pytest.raises(ConfigError, match=r"pp=3 must divide num_layers=4; try pp in \[1, 2, 4\]"):
        hf2mcore.convert(HF2McoreConfig(hf_dir=str(tiny_hf()), out_dir=str(tmp_path / "o"), pp=3))


def test_non_empty_out_dir_is_refused_unless_forced(tiny_hf, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    cfg = HF2McoreConfig(hf_dir=str(tiny_hf()), out_dir=str(out))
    with pytest.raises(ConfigError, match="is not empty"):
        hf2mcore.convert(cfg)
    assert (out / "keep.txt").read_text() == "user data"
    cfg.force = True
    hf2mcore.convert(cfg)
    assert not (out / "keep.txt").exists() and (out / "release").is_dir()


def test_missing_shard_file_is_named(tiny_hf, tmp_path):
    hf = tiny_hf()
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in hf.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        hf2mcore.convert(HF2McoreConfig(hf_dir=str(broken), out_dir=str(tmp_path / "o")))


def test_weights_that_contradict_config_are_refused(tiny_hf, tmp_path):
    hf = tiny_hf(shard=None)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"mlp.gate_proj.weight has shape \[128, 64\] but "
        r"config.json implies \[96, 64\]",
    ):
        hf2mcore.convert(HF2McoreConfig(hf_dir=str(bad), out_dir=str(tmp_path / "o")))


def test_checkpoint_tensors_must_match_args(tiny_hf, tmp_path):
    ckpt = tmp_path / "c"
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(tiny_hf()), out_dir=str(ckpt), tp=2))
    path = ckpt / "release/mp_rank_01/model_optim_rng.pt"
    payload = load_rank_file(path, mmap=False)
    name = "decoder.layers.1.mlp.linear_fc2.weight"
    payload["model"][name] = payload["model"][name][:, :32].clone()
    torch.save(payload, path)
    with pytest.raises(
        CheckpointError,
        match=rf"mp_rank_01.*{name} has shape \[64, 32\] but the "
        r"checkpoint args imply \[64, 64\]",
    ):
        mcore2hf.convert(McoreToHFConfig(ckpt_dir=str(ckpt), out_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_incomplete_checkpoint_names_the_missing_rank_file(tiny_hf, tmp_path):
    ckpt = tmp_path / "c"
    hf2mcore.convert(HF2McoreConfig(hf_dir=str(tiny_hf()), out_dir=str(ckpt), tp=2, pp=2))
    (ckpt / "release/mp_rank_01_001/model_optim_rng.pt").unlink()
    with pytest.raises(CheckpointError, match=r"mp_rank_01_001/model_optim_rng.pt not found"):
        mcore2hf.convert(McoreToHFConfig(ckpt_dir=str(ckpt), out_dir=str(tmp_path / "o")))


def test_a_failure_mid_write_leaves_nothing_and_keeps_the_old_output(
    tiny_hf, tmp_path, monkeypatch
):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("previous result")
    calls = []
    real_save = hf2mcore.save_rank_file

    def failing_save(path, payload):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(path, payload)

    monkeypatch.setattr(hf2mcore, "save_rank_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        hf2mcore.convert(HF2McoreConfig(hf_dir=str(tiny_hf()), out_dir=str(out), tp=2, force=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert (out / "old.txt").read_text() == "previous result"


def test_cli_reports_bad_input_in_one_line_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "converters.hf2mcore",
            f"hf_dir={tmp_path / 'none'}",
            f"out_dir={tmp_path / 'o'}",
            "tp=2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        f"error: {tmp_path / 'none' / 'config.json'} not found; hf_dir must be a "
        "Hugging Face model directory"
    ]
    assert not (tmp_path / "o").exists()


def test_cli_rejects_a_misspelt_key_with_a_suggestion():
    proc = subprocess.run(
        [sys.executable, "-m", "converters.mcore2hf", "ckpt_dir=a", "out_dir=b", "dtyp=bf16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "error: unknown config key 'dtyp' in 'dtyp=bf16'; did you mean dtype?"
    )
