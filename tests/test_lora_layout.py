"""LoRA without processes: the adapter layouts merge shard by shard, the PEFT split inverts the
fused layouts, and the settings are validated by name."""

from __future__ import annotations

import pytest
import torch

from mtrain.checkpoint import AdapterCheckpointInfo
from mtrain.checkpoint.peft import merge_adapter, peft_names
from mtrain.config.lora import LoraConfig
from mtrain.errors import CheckpointError, ConfigError
from mtrain.lora import merged_weight
from mtrain.models.families.base import Kind
from mtrain.models.sharding import Dims, merge, shard
from tests.conftest import tiny_spec

R, SCALING = 4, 2.0
# GQA with several heads per group, so a plain cat([q, k, v]) would be caught.
SPEC = tiny_spec(num_attention_heads=8, num_query_groups=2, kv_channels=8, hidden_size=32)


def full_matrices(entry, dims: Dims, seed: int):
    """Random HF weights of one entry, and a random adapter (A, B) per HF tensor; for fused
    entries (q/k/v, gate/up) A is shared, as megatron has one A for the fused linear."""
    g = torch.Generator().manual_seed(seed)
    shapes = dims.hf_shapes(entry)
    weights = [torch.randn(*s, generator=g) for s in shapes]
    a_shared = torch.randn(R, shapes[0][1], generator=g)
    adapters = [(a_shared, torch.randn(s[0], R, generator=g)) for s in shapes]
    return weights, adapters


def reader(tensors: dict[str, torch.Tensor]):
    def read(name, rows=None, cols=None):
        t = tensors[name]
        t = t[rows] if rows is not None else t
        return t[:, cols] if cols is not None else t

    return read


def adapter_shards(entry, names, adapters, dims: Dims, rank: int):
    """This TP rank's (A, B) as mtrain lays them out: column-like bases split B like the weight
    and replicate A; row bases split A's columns like the weight and replicate B."""
    a_full, b = adapters[0][0], {n: ab[1] for n, ab in zip(names, adapters)}
    if entry.kind is Kind.ROW:
        width = a_full.shape[1] // dims.tp
        return a_full[:, rank * width : (rank + 1) * width], adapters[0][1]
    return a_full, shard(entry, names, reader(b), rank, dims)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("target", ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
def test_each_rank_merging_its_shard_equals_merging_the_whole_matrix(target, tp):
    entry = SPEC.family_table.lora_targets[target]
    dims = Dims.of(SPEC, tp)
    names = [f"m{i}" for i in range(len(entry.hf))]
    weights, adapters = full_matrices(entry, dims, seed=tp)
    merged_hf = [merged_weight(w, a, b, SCALING) for w, (a, b) in zip(weights, adapters)]
    # W + s B A per HF tensor, in float64 as the independent reference.
    for w, (a, b), m in zip(weights, adapters, merged_hf):
        torch.testing.assert_close(m, (w.double() + SCALING * b.double() @ a.double()).float())
    w_read = reader(dict(zip(names, weights)))
    merged_shards = []
    for rank in range(tp):
        a_t, b_t = adapter_shards(entry, names, adapters, dims, rank)
        merged_shards.append(
            merged_weight(shard(entry, names, w_read, rank, dims), a_t, b_t, SCALING)
        )
    for got, want in zip(merge(entry, merged_shards, dims), merged_hf):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("target", ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
def test_peft_split_recovers_each_hf_modules_adapter(target, tp):
    entry = SPEC.family_table.lora_targets[target]
    dims = Dims.of(SPEC, tp)
    names = [f"m{i}" for i in range(len(entry.hf))]
    _, adapters = full_matrices(entry, dims, seed=10 + tp)
    shards = [adapter_shards(entry, names, adapters, dims, rank) for rank in range(tp)]
    pairs = merge_adapter(entry, [a for a, _ in shards], [b for _, b in shards], dims, "test")
    assert len(pairs) == len(entry.hf)
    for (a, b), (a_want, b_want) in zip(pairs, adapters):
        assert torch.equal(a, a_want) and torch.equal(b, b_want)


def test_inconsistent_replicated_adapter_is_refused():
    entry = SPEC.family_table.lora_targets["linear_qkv"]
    dims = Dims.of(SPEC, 2)
    a = torch.zeros(R, 32)
    b = [torch.zeros(sum(s[0] for s in dims.hf_shapes(entry)) // 2, R)] * 2
    with pytest.raises(CheckpointError, match="differs between TP ranks 0 and 1"):
        merge_adapter(entry, [a, a + 1], b, dims, "ckpt/mp_rank_00")


def test_peft_names_follow_the_hf_module():
    assert peft_names("model.layers.3.self_attn.q_proj.weight") == (
        "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight",
    )


def test_scaling_is_alpha_over_r_or_over_sqrt_r_with_rslora():
    assert LoraConfig(r=16, alpha=32).scaling == 2.0
    assert LoraConfig(r=16, alpha=32, rslora=True).scaling == 8.0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"r": 0}, "lora.r=0 must be a positive integer"),
        ({"alpha": -1.0}, "lora.alpha=-1.0 must be positive"),
        ({"dropout": 1.0}, r"lora.dropout=1.0 must be in \[0, 1\)"),
        ({"target_modules": []}, "lora.target_modules is empty"),
        (
            {"target_modules": ["q_proj"]},
            "'q_proj' is an HF name; megatron fuses it into 'linear_qkv'",
        ),
        ({"target_modules": ["linear_qkv", "linear_qkv"]}, "names a module twice"),
        ({"target_modules": ["attn"]}, "'attn' is not one of"),
    ],
)
def test_bad_lora_settings_are_refused_by_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**changes).validate()


def test_resuming_with_other_lora_settings_is_refused():
    saved = AdapterCheckpointInfo(LoraConfig(r=8), "/base", "release")
    saved.check_matches(LoraConfig(r=8, dropout=0.1), "ckpt")  # dropout may change
    with pytest.raises(ConfigError, match="lora.r=4 but ckpt was trained with lora.r=8"):
        saved.check_matches(LoraConfig(r=4), "ckpt")
    with pytest.raises(ConfigError, match="has adapters on"):
        saved.check_matches(LoraConfig(r=8, target_modules=["linear_qkv"]), "ckpt")


def test_adapter_args_round_trip_and_a_moved_base_is_named(tmp_path):
    import argparse

    info = AdapterCheckpointInfo(
        LoraConfig(r=4, alpha=8.0, rslora=True), str(tmp_path / "gone"), "7"
    )
    back = AdapterCheckpointInfo.from_args(argparse.Namespace(**info.to_args()), "args")
    assert back == info
    with pytest.raises(CheckpointError, match="base checkpoint .*gone.* is gone; pass its new"):
        info.resolve_base(None)
    assert info.resolve_base(tmp_path) == (tmp_path, None)
