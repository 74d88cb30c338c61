"""The mixture-of-experts part of `ModelSpec` (mtrain/models/spec.py): its checks and its
config.json keys (Qwen3-MoE's names)."""

from __future__ import annotations

from typing import Any

from mtrain.errors import ConfigError

MOE_FIELDS = (
    "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_norm_topk_prob",
    "moe_dense_layers",
)  # fmt: skip


def validate(spec: Any, source: str) -> None:
    moe = {k: getattr(spec, k) for k in MOE_FIELDS}
    if spec.family_table.expert and not spec.is_moe:
        raise ConfigError(
            f"{source}: family={spec.family} is a mixture of experts; give num_experts, "
            "moe_router_topk and moe_ffn_hidden_size"
        )
    if not spec.family_table.expert and any(v is not None for v in moe.values()):
        given = next(k for k, v in moe.items() if v is not None)
        raise ConfigError(
            f"{source}: {given} is for mixture-of-experts families (qwen3_moe), not "
            f"family={spec.family}"
        )
    if not spec.is_moe:
        return
    for name in ("num_experts", "moe_router_topk", "moe_ffn_hidden_size"):
        value = moe[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{source}: {name}={value!r} must be a positive integer")
    if spec.moe_router_topk > spec.num_experts:
        raise ConfigError(
            f"{source}: moe_router_topk={spec.moe_router_topk} must be <= "
            f"num_experts={spec.num_experts}"
        )
    bad = [i for i in spec.moe_dense_layers or () if not 0 <= i < spec.num_layers]
    if bad:
        raise ConfigError(
            f"{source}: moe_dense_layers has {bad[0]}, not a layer of 0..{spec.num_layers - 1}"
        )


def check_experts(spec: Any, ep: int, etp: int, source: str = "") -> None:
    """Refuse an expert-parallel layout this model cannot be split into."""
    source = f"{source}: " if source else ""
    if ep < 1 or etp < 1:
        raise ConfigError(f"{source}ep={ep} and etp={etp} must be >= 1")
    if not spec.is_moe:
        if ep > 1:
            raise ConfigError(f"{source}ep={ep} needs a mixture-of-experts model; use ep=1")
        return
    if spec.num_experts % ep:
        ok = [e for e in range(1, spec.num_experts + 1) if spec.num_experts % e == 0]
        raise ConfigError(
            f"{source}ep={ep} must divide num_experts={spec.num_experts}; try ep in {ok}"
        )
    if spec.moe_ffn_hidden_size % etp:
        raise ConfigError(
            f"{source}etp={etp} must divide moe_ffn_hidden_size={spec.moe_ffn_hidden_size}"
        )


def from_hf(read: Any, layers: int) -> dict[str, Any]:
    """The MoE keys of a Qwen3-MoE config.json. A layer is sparse unless listed in
    `mlp_only_layers` or skipped by `decoder_sparse_step` (sparse when (i + 1) % step == 0)."""
    cfg, source = read.cfg, read.source
    if cfg.get("shared_expert_intermediate_size"):
        raise ConfigError(f"{source}: shared experts are not supported (Qwen3-MoE has none)")
    experts = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"
    step = read.integer("decoder_sparse_step", 1)
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
        raise read.fail("mlp_only_layers", "a list of layer numbers")
    return dict(
        num_experts=read.integer(experts),
        moe_router_topk=read.integer("num_experts_per_tok"),
        moe_ffn_hidden_size=read.integer("moe_intermediate_size"),
        moe_norm_topk_prob=read.boolean("norm_topk_prob", False),  # transformers' default
        moe_dense_layers=tuple(i for i in range(layers) if i in only or (i + 1) % step),
    )


def hf_kwargs(spec: Any) -> dict[str, Any]:
    """The config.json keys of an MoE spec ({} for a dense one)."""
    if not spec.is_moe:
        return {}
    return dict(
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.moe_router_topk,
        moe_intermediate_size=spec.moe_ffn_hidden_size,
        norm_topk_prob=spec.moe_norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=list(spec.moe_dense_layers),
    )
