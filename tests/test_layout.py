"""The TP layouts against independent full-tensor formulas (DESIGN.md section 4)."""

from __future__ import annotations

import pytest
import torch

from mtrain.models.families import FAMILIES
from mtrain.models.families.base import Entry
from mtrain.models.sharding import Dims, merge, shard, shard_shape
from tests.conftest import tiny_spec

QWEN2 = FAMILIES["qwen2"]


def entry(mcore: str) -> Entry:
    return next(e for e in QWEN2.layer if e.mcore == mcore)


def random_hf(e: Entry, dims: Dims) -> dict[str, torch.Tensor]:
    return {n: torch.randn(s) for n, s in zip(e.hf, dims.hf_shapes(e))}


def reader_of(tensors: dict[str, torch.Tensor]):
    def read(name, rows=None, cols=None):
        t = tensors[name]
        if rows is not None:
            t = t[rows]
        if cols is not None:
            t = t[:, cols]
        return t.clone()

    return read


def shards_of(e: Entry, tensors, dims: Dims) -> list[torch.Tensor]:
    return [shard(e, list(e.hf), reader_of(tensors), t, dims) for t in range(dims.tp)]


SPEC = tiny_spec(
    family="qwen2", num_attention_heads=8, num_query_groups=4, kv_channels=16, vocab_size=509
)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize(
    "name", ["self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"]
)
def test_qkv_shard_is_the_gqa_interleave_chunked(tp, name):
    dims = Dims.of(SPEC, tp)
    e = entry(name)
    hf = random_hf(e, dims)
    q, k, v = hf.values()
    G, d, h = SPEC.num_query_groups, SPEC.kv_channels, SPEC.heads_per_group
    rest = q.shape[1:]
    fused = torch.cat([q.view(G, h * d, *rest), k.view(G, d, *rest), v.view(G, d, *rest)], dim=1)
    expected = fused.reshape(-1, *rest).chunk(tp, dim=0)
    got = shards_of(e, hf, dims)
    for t in range(tp):
        assert torch.equal(got[t], expected[t])
        assert tuple(got[t].shape) == shard_shape(e, dims)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fc1_shard_is_gate_then_up_per_rank(tp):
    dims = Dims.of(SPEC, tp)
    e = entry("mlp.linear_fc1.weight")
    hf = random_hf(e, dims)
    gate, up = hf.values()
    got = shards_of(e, hf, dims)
    for t in range(tp):
        assert torch.equal(got[t], torch.cat([gate.chunk(tp)[t], up.chunk(tp)[t]]))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_parallel_splits_input_features(tp):
    dims = Dims.of(SPEC, tp)
    e = entry("self_attention.linear_proj.weight")
    hf = random_hf(e, dims)
    (w,) = hf.values()
    got = shards_of(e, hf, dims)
    assert all(torch.equal(g, w.chunk(tp, dim=1)[t]) for t, g in enumerate(got))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_is_padded_with_zero_rows_and_trimmed_back(tp):
    dims = Dims.of(SPEC, tp)  # 509 rows: padded to 510 (tp=2) or 512 (tp=4)
    e = QWEN2.embedding
    hf = random_hf(e, dims)
    (w,) = hf.values()
    got = shards_of(e, hf, dims)
    full = torch.cat(got)
    assert full.shape[0] == -(-509 // tp) * tp
    assert torch.equal(full[:509], w)
    assert torch.count_nonzero(full[509:]) == 0
    assert torch.equal(merge(e, got, dims)[0], w)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize(
    "e", QWEN2.layer + (QWEN2.embedding, QWEN2.final_norm), ids=lambda e: e.mcore
)
def test_merge_inverts_shard_bit_exactly(tp, e):
    dims = Dims.of(SPEC, tp)
    hf = random_hf(e, dims)
    merged = merge(e, shards_of(e, hf, dims), dims)
    assert len(merged) == len(hf)
    for original, back in zip(hf.values(), merged):
        assert back.dtype == original.dtype and torch.equal(back, original)


def test_fused_parts_of_different_dtypes_go_to_the_widest_losslessly():
    dims = Dims.of(SPEC, 2)
    e = entry("mlp.linear_fc1.weight")
    hf = random_hf(e, dims)
    hf["mlp.gate_proj.weight"] = hf["mlp.gate_proj.weight"].bfloat16()
    got = shards_of(e, hf, dims)
    assert got[0].dtype == torch.float32
    gate, up = merge(e, got, dims)
    assert torch.equal(gate.bfloat16(), hf["mlp.gate_proj.weight"])
    assert torch.equal(up, hf["mlp.up_proj.weight"])
