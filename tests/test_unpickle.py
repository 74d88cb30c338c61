"""`load_restricted` opens the rank files MindSpeed-LLM writes (pickle protocol 4) and refuses code.

- A Megatron-LM / MindSpeed-LLM rank file saved under any pickle protocol reads back equal to the
  object saved (the reference is that object itself): same dtypes, bit-equal tensors, a view still
  sharing its base's storage, the numpy and Python RNG states, the enums in `args`.
- torch's own `weights_only=True` loader cannot read protocol 4 (the reason this module exists).
- A file that asks for anything outside the allowlist (os.system) is refused by name before it
  runs; legacy, truncated, damaged and foreign files give one line naming the path.
"""

from __future__ import annotations

import argparse
import codecs
import os
import pickle
import random
import sys
import warnings
import zipfile
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrain.checkpoint.unpickle import load_restricted
from mtrain.errors import CheckpointError

PROTOCOLS = [0, 1, 2, 3, 4, 5]


def rank_file_payload() -> dict:
    """What Megatron-LM's legacy `save_checkpoint` (and MindSpeed-LLM's) puts in one rank file,
    in miniature."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(12, 8, generator=gen).to(torch.bfloat16)
    main_param = torch.randn(12, 8, generator=gen)  # fp32 master copy, with Megatron's attributes
    main_param.tensor_model_parallel = True
    main_param.partition_dim = 0
    args = argparse.Namespace(
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=1,
        num_layers=2,
        hidden_size=8,
        params_dtype=torch.bfloat16,
        bf16=True,
        model_type=ModelType.encoder_or_decoder,
        attention_backend=AttnBackend.auto,
        data_path=["1.0", "/data/corpus_text_document"],
        load=None,
        lr=1e-4,
    )
    model = OrderedDict(
        [
            ("embedding.word_embeddings.weight", torch.randn(16, 8, generator=gen).bfloat16()),
            ("decoder.layers.0.self_attention.linear_qkv.weight", qkv),
            ("decoder.layers.0.self_attention.linear_qkv.q_rows", qkv[4:8]),  # a view of qkv
            ("decoder.final_layernorm.weight", torch.ones(8)),
            ("decoder.layers.0.self_attention.linear_qkv._extra_state", None),
        ]
    )
    optimizer = {
        "optimizer": {
            "state": {0: {"exp_avg": torch.zeros(12, 8), "step": torch.tensor(10.0)}},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "params": [0]}],
        },
        "fp32_from_fp16_params": [[main_param]],
        "grad_scaler": {"scale": torch.tensor([4096.0]), "growth_tracker": 3},
    }
    return {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": 10,
        "model": model,
        "optimizer": optimizer,
        "opt_param_scheduler": {"max_lr": 1e-4, "num_steps": 160, "decay_style": "cosine"},
        "rng_state": [
            {
                "random_rng_state": random.getstate(),
                "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(),
                "cuda_rng_state": torch.get_rng_state(),
                "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
            }
        ],
        "num_floating_point_operations_so_far": 1.5e12,
        "extras": {"empty": torch.empty(0), "bytes": b"\x00\xff", "ids": {1, 2}, "z": 1 + 2j},
    }


def assert_same(loaded, saved, where="payload"):
    """Equal values of the same types; tensors bit-equal with the same dtype and attributes."""
    assert type(loaded) is type(saved), where
    if isinstance(saved, torch.Tensor):
        assert loaded.dtype == saved.dtype and torch.equal(loaded, saved), where
        assert vars(loaded) == vars(saved), where  # Python attributes (tensor_model_parallel)
    elif isinstance(saved, np.ndarray):
        assert loaded.dtype == saved.dtype and np.array_equal(loaded, saved), where
    elif isinstance(saved, argparse.Namespace):
        assert_same(vars(loaded), vars(saved), where)
    elif isinstance(saved, dict):
        assert list(loaded) == list(saved), where
        for key in saved:
            assert_same(loaded[key], saved[key], f"{where}[{key!r}]")
    elif isinstance(saved, (list, tuple)):
        assert len(loaded) == len(saved), where
        for i, (a, b) in enumerate(zip(loaded, saved)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert loaded == saved, where


def save(payload, path: Path, protocol: int) -> Path:
    torch.save(payload, path, pickle_protocol=protocol)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        load_restricted(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


# -- a rank file reads back as saved -------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=[f"protocol{p}" for p in PROTOCOLS])
def test_rank_file_reads_back_equal_to_what_was_saved(tmp_path, protocol):
    payload = rank_file_payload()
    loaded = load_restricted(save(payload, tmp_path / "model_optim_rng.pt", protocol))
    assert_same(loaded, payload)


@pytest.mark.parametrize("protocol", [2, 4, 5], ids=["protocol2", "protocol4", "protocol5"])
def test_a_view_still_shares_its_base_storage(tmp_path, protocol):
    loaded = load_restricted(save(rank_file_payload(), tmp_path / "rank.pt", protocol))["model"]
    base = loaded["decoder.layers.0.self_attention.linear_qkv.weight"]
    view = loaded["decoder.layers.0.self_attention.linear_qkv.q_rows"]
    assert view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    assert view.storage_offset() == 4 * 8
    base[4, 0] = 7.0
    assert view[0, 0].item() == 7.0


def test_a_defaultdict_state_dict_reads_back_as_a_plain_dict(tmp_path):
    """MindSpeed-LLM's hf2mg saves `model` as a defaultdict(dict); its factory is not kept."""
    model = defaultdict(dict, {"w": torch.ones(2, 3)})
    loaded = load_restricted(save({"model": model}, tmp_path / "rank.pt", 4))["model"]
    assert type(loaded) is dict and list(loaded) == ["w"] and torch.equal(loaded["w"], model["w"])


def test_torch_weights_only_cannot_read_protocol_4(tmp_path):
    """Why this module exists. torch's weights_only unpickler interprets protocol 2's opcodes
    only; torch 2.13 stops at protocol 4's FRAME (opcode 149). The payload is tensors in dicts, which that
    loader admits, so the protocol is the only difference."""
    payload = {"model": {"w": torch.ones(2, 3)}, "iteration": 1}
    assert torch.equal(
        torch.load(save(payload, tmp_path / "p2.pt", 2), weights_only=True)["model"]["w"],
        payload["model"]["w"],
    )
    path = save(payload, tmp_path / "p4.pt", 4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4 in the checkpoint"
            torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        assert "Unsupported operand" in str(err)
    else:
        pytest.skip(f"torch {torch.__version__} reads protocol 4 with weights_only=True")
    assert torch.equal(load_restricted(path)["model"]["w"], payload["model"]["w"])


def test_big_endian_storages_are_swapped_to_native(tmp_path):
    """A file with byteorder b'big' (written on a big-endian host), built by swapping each
    record of a little-endian save; every tensor in it has 4-byte elements."""
    payload = {"w": torch.randn(3, 4), "i": torch.arange(-5, 5, dtype=torch.int32)}
    little = save(payload, tmp_path / "little.pt", 2)
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name:
                data = np.frombuffer(data, dtype="<u4").astype(">u4").tobytes()
            dst.writestr(name, data)
    assert_same(load_restricted(big), payload)


# -- what is refused -----------------------------------------------------------------------------


class RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4], ids=["protocol2", "protocol4"])
def test_a_file_that_calls_os_system_is_refused_before_it_runs(tmp_path, protocol):
    marker = tmp_path / "it_ran"
    payload = {"args": argparse.Namespace(), "model": {"w": torch.ones(1)}, "x": RunsShell(marker)}
    message = refusal(save(payload, tmp_path / "evil.pt", protocol))
    assert f"asks to unpickle {os.system.__module__}.system" in message  # posix.system
    assert "refused to open" in message
    assert not marker.exists()


# BUILD on an object the file did not build: (None, {"injected": 1}) set on it for the process
INJECT = b"N}X\x08\x00\x00\x00injectedK\x01s\x86b."
SHARED = {
    "argparse.Namespace": (b"\x80\x02cargparse\nNamespace\n", "argparse.Namespace"),
    "an enum member": (
        b"\x80\x02cmegatron.core.enums\nModelType\nK\x01\x85R",  # ModelType(1)
        "a megatron.core.enums.ModelType",
    ),
}


@pytest.mark.parametrize("target", list(SHARED))
def test_a_file_cannot_set_attributes_on_a_shared_object(tmp_path, target):
    """The stock unpickler would set `injected` on the class (or the member) itself, for
    every later user in the process."""
    pushes, named = SHARED[target]
    path = tmp_path / "patch.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("patch/data.pkl", pushes + INJECT)
    assert f"set attributes on {named}" in refusal(path)
    from megatron.core.enums import ModelType

    assert not hasattr(argparse.Namespace, "injected")
    assert not hasattr(ModelType.encoder_or_decoder, "injected")


def test_codecs_other_than_latin1_are_refused(tmp_path):
    """Protocols 0-2 store bytes as _codecs.encode(text, 'latin1'); zlib and kin would
    decompress whatever size the file asks for."""

    class Inflates:
        def __reduce__(self):
            return (codecs.encode, (b"x" * 16, "zlib_codec"))

    assert "_codecs.encode(..., 'zlib_codec')" in refusal(save(Inflates(), tmp_path / "z.pt", 2))


def test_an_enum_whose_module_cannot_be_imported_is_refused_by_name(tmp_path, monkeypatch):
    from megatron.core.enums import ModelType

    path = save(
        {"args": argparse.Namespace(model_type=ModelType.encoder_or_decoder)}, tmp_path / "e.pt", 4
    )
    monkeypatch.setitem(sys.modules, "megatron.core.enums", None)  # import now fails
    message = refusal(path)
    assert "megatron.core.enums.ModelType" in message and "cannot be imported" in message


def test_a_legacy_non_zip_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert "legacy" in refusal(path)


def test_a_truncated_file_is_refused_in_one_line(tmp_path):
    path = save(rank_file_payload(), tmp_path / "rank.pt", 4)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated" in refusal(path)


def test_a_damaged_tensor_record_is_caught_by_its_crc(tmp_path):
    path = save({"w": torch.zeros(256)}, tmp_path / "rank.pt", 4)
    data = bytearray(path.read_bytes())
    at = data.index(b"\x00" * 1024)  # inside the record data/0
    data[at] = 1
    path.write_bytes(bytes(data))
    assert "CRC" in refusal(path)


def test_a_zip_without_data_pkl_and_a_foreign_file_are_refused(tmp_path):
    not_torch = tmp_path / "notes.zip"
    with zipfile.ZipFile(not_torch, "w") as z:
        z.writestr("notes/readme.txt", "hello")
    assert "data.pkl" in refusal(not_torch)
    text = tmp_path / "config.yaml"
    text.write_text("a: 1\n")
    assert "not a torch checkpoint" in refusal(text)
    assert "not found" in refusal(tmp_path / "missing.pt")


def test_a_plain_pickle_in_a_zip_is_read_too(tmp_path):
    """No tensors at all: the archive is only data.pkl (any protocol's pickle)."""
    path = tmp_path / "plain.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"iteration": 3, "s": {1}}, protocol=5))
    assert load_restricted(path) == {"iteration": 3, "s": {1}}
