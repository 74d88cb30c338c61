"""Slice reads of safetensors files, straight into a tensor of the caller's, against slicing the
whole tensor loaded by the safetensors library (the independent reference); exact."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mtrain.checkpoint import hf_io
from mtrain.checkpoint.hf_io import HFReader
from mtrain.models.families import FAMILIES
from mtrain.models.sharding import Dims, shard, shard_into, shard_shape
from tests.conftest import tiny_spec

# Odd vocabulary: the last TP rank has padding rows; GQA with two heads per group.
SPEC = tiny_spec(
    family="qwen2", num_attention_heads=8, num_query_groups=4, kv_channels=16, vocab_size=509
)
FAMILY = FAMILIES["qwen2"]
ENTRIES = [FAMILY.embedding, *FAMILY.layer, FAMILY.final_norm]


def write_model(path, dtype_of) -> dict[str, torch.Tensor]:
    """Every HF tensor of one layer, the embedding and the final norm, random, in one file."""
    dims = Dims.of(SPEC, 1)
    g = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.randn(shape, generator=g).to(dtype_of(name))
        for e in ENTRIES
        for name, shape in zip(e.hf, dims.hf_shapes(e))
    }
    save_file(tensors, str(path / "model.safetensors"))
    return tensors


def slicer(tensors: dict[str, torch.Tensor]):
    def read(name, rows=None, cols=None):
        t = tensors[name]
        t = t[rows] if rows is not None else t
        return t[:, cols] if cols is not None else t

    return read


@pytest.mark.parametrize("rows", [None, slice(3, 70), slice(0, 1), slice(500, 600)])
@pytest.mark.parametrize("cols", [None, slice(0, 32), slice(16, 64), slice(5, 6)])
@pytest.mark.parametrize("block", [hf_io._MAP_BLOCK, 300, 1], ids=["block", "2rows", "1row"])
def test_a_slice_read_into_any_tensor_equals_slicing_the_whole(
    tmp_path, monkeypatch, rows, cols, block
):
    monkeypatch.setattr(hf_io, "_MAP_BLOCK", block)  # column slices: rows mapped per block
    tensors = write_model(tmp_path, lambda name: torch.bfloat16)
    name = FAMILY.embedding.hf[0]  # 509 x 64
    want = slicer(tensors)(name, rows, cols)
    reader = HFReader(tmp_path)
    with reader.session():
        assert torch.equal(reader(name, rows, cols), want)
        into = torch.full(want.shape, float("nan"), dtype=torch.float32)  # cast on the way
        reader.read_into(name, into, rows, cols)
        assert torch.equal(into, want.float())
        strided = torch.full((want.shape[1], want.shape[0]), float("nan"), dtype=torch.bfloat16)
        reader.read_into(name, strided.t(), rows, cols)  # not contiguous
        assert torch.equal(strided.t(), want)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_each_shard_read_straight_into_a_parameter_equals_the_converters_shard(
    tmp_path, tp, out_dtype
):
    """Every tensor kind (qkv with bias, gated fc1, row, column, padded vocabulary, replicated),
    in a file whose dtypes differ between the parts of one fused tensor."""
    tensors = write_model(tmp_path, lambda n: torch.float32 if "k_proj" in n else torch.bfloat16)
    dims = Dims.of(SPEC, tp)
    reader = HFReader(tmp_path)
    with reader.session():
        for e in ENTRIES:
            for rank in range(tp):
                want = shard(e, list(e.hf), slicer(tensors), rank, dims)
                param = torch.full(shard_shape(e, dims), float("nan"), dtype=out_dtype)
                shard_into(e, list(e.hf), reader, rank, dims, param)
                assert torch.equal(param, want.to(out_dtype)), (e.mcore, rank)
                assert torch.equal(shard(e, list(e.hf), reader, rank, dims), want), e.mcore
