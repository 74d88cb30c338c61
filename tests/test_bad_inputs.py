"""Bad input files and values: one `error:` line naming the file or key, exit code 2, no traceback.

Each case here once gave a traceback (or reached torch) instead of a message a user can act on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from mtrain.checkpoint.hf_io import HFReader
from mtrain.config.model import load_preset
from mtrain.config.schema import TrainingCommandConfig, validate
from mtrain.errors import CheckpointError, ConfigError
from mtrain.models.spec import load_hf_config
from tests.conftest import TINY


def hf2mcore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "converters.hf2mcore", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture()
def hf_copy(tiny_hf, tmp_path):
    """A writable copy of the tiny HF model (single-file and sharded variants share it)."""
    out = tmp_path / "hf"
    shutil.copytree(tiny_hf(TINY), out)
    return out


def edit_config(hf_dir, **changes) -> None:
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_hidden_layers": "four"}, r"num_hidden_layers='four' must be a positive integer"),
        ({"num_attention_heads": 0}, r"num_attention_heads=0 must be a positive integer"),
        ({"hidden_size": 6.5}, r"hidden_size=6.5 must be a positive integer"),
        ({"rope_scaling": "linear"}, r"rope_scaling='linear' must be a JSON object or null"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": "big"}},
            r"rope_theta='big' must be a positive number",
        ),
        ({"rope_parameters": 5}, r"rope_parameters=5 must be a JSON object"),
        ({"tie_word_embeddings": "yes"}, r"tie_word_embeddings='yes' must be true or false"),
        ({"rms_norm_eps": -1}, r"rms_norm_eps=-1 must be a positive number"),
        ({"model_type": ["qwen3"]}, r"model_type=\['qwen3'\] is not supported"),
    ],
)
def test_config_json_with_wrong_types_or_values_names_the_field(hf_copy, changes, message):
    edit_config(hf_copy, **changes)
    with pytest.raises(ConfigError, match=rf"config.json: {message}"):
        load_hf_config(hf_copy)


def test_config_json_that_is_a_list_or_not_utf8_is_refused(hf_copy):
    path = hf_copy / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config.json: must hold a JSON object, not a list"):
        load_hf_config(hf_copy)
    path.write_bytes(b'{"model_type": "qwen3\xff"}')
    with pytest.raises(CheckpointError, match=r"config.json: not UTF-8 text"):
        load_hf_config(hf_copy)


def test_an_index_whose_weight_map_is_a_list_is_refused(hf_copy):
    index = hf_copy / "model.safetensors.index.json"
    assert index.is_file()  # the fixture's model is sharded
    index.write_text(json.dumps({"metadata": {}, "weight_map": ["a", "b"]}))
    with pytest.raises(CheckpointError, match=r"index.json: weight_map must map tensor names"):
        HFReader(hf_copy)


def test_a_truncated_safetensors_file_is_named_before_anything_is_read(hf_copy):
    shard = sorted(hf_copy.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated \(\d+ bytes"):
        HFReader(hf_copy)


def test_bad_config_json_through_the_converter_is_one_line(hf_copy, tmp_path):
    edit_config(hf_copy, num_hidden_layers="four")
    proc = hf2mcore(f"hf_dir={hf_copy}", f"out_dir={tmp_path / 'out'}")
    assert_one_line(proc, "config.json", "num_hidden_layers")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", -1e-4, r"train.lr=-0.0001 must be >= 0"),
        ("weight_decay", -0.1, r"train.weight_decay=-0.1 must be >= 0"),
        ("adam_beta2", 1.0, r"train.adam_beta2=1.0 must be in \[0, 1\)"),
        ("adam_eps", 0.0, r"train.adam_eps=0.0 must be positive"),
        ("clip_grad", -1.0, r"train.clip_grad=-1.0 must be >= 0"),
    ],
)
def test_optimizer_values_torch_would_reject_are_refused_up_front(key, value, message):
    cfg = TrainingCommandConfig(model=load_preset("qwen3_tiny"))
    cfg.train.iters, cfg.train.seq_length, cfg.data.path = 10, 128, "corpus.jsonl"
    setattr(cfg.train, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=4)
