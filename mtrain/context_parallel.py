"""Context parallelism (`parallel.cp`): which tokens of a sequence each CP rank holds, and the
layout rules.

Every sequence is cut into 2C equal chunks; CP rank r holds chunks r and 2C-1-r (megatron's
load balance: under a causal mask an early chunk attends to few tokens and a late one to many,
so each rank gets one of each and the attention costs the same everywhere). megatron-core's
RoPE takes the same two chunks of its position table (`get_pos_emb_on_this_cp_rank`), so every
token is rotated by its true position. The attention mask (a packed row's block-causal mask or
its cu_seqlens) stays whole: the attention under CP sees the whole sequence (Ulysses,
mtrain/kernels/ulysses.py) in true order. Losses are sums over each rank's own tokens; counts are
summed over CP with data parallelism (mtrain/schedule.py).
"""

from __future__ import annotations

from typing import Any

from mtrain.errors import ConfigError

# Batch tensors laid out along the sequence (last dim): each CP rank keeps its chunks of them.
SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
# MindSpeed's CP algorithms (--context-parallel-algo) mtrain runs, and how each lays a sequence
# out (MindSpeed's get_batch_on_this_cp_rank): its Ulysses keeps contiguous chunks.
MINDSPEED_ALGOS = {
    "ulysses_cp_algo": "contiguous",  # rank r holds chunk r of C
    "megatron_cp_algo": "balanced",  # ring attention: chunks r and 2C-1-r of 2C
}
CP_ALGOS = tuple(MINDSPEED_ALGOS)


def chunk_order(cp: int) -> list[int]:
    """The chunks (of 2C) the CP ranks hold, rank by rank: [0, 2C-1, 1, 2C-2, ...]."""
    return [c for r in range(cp) for c in (r, 2 * cp - 1 - r)]


def rank_chunks(x: Any, cp: int, rank: int, layout: str = "balanced") -> Any:
    """This CP rank's part of the tensor `x` along its last dim."""
    import torch

    if layout == "contiguous":
        return x.chunk(cp, dim=-1)[rank]
    chunks = x.chunk(2 * cp, dim=-1)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=-1)


def shard_batch(batch: dict, cp: int, rank: int, layout: str = "balanced") -> dict:
    """The batch as CP rank `rank` sees it: its chunks of the per-token tensors, the rest
    (attention masks, cu_seqlens, DPO reference log-probs) whole."""
    if cp == 1:
        return batch
    return {
        k: rank_chunks(v, cp, rank, layout) if k in SEQUENCE_KEYS else v for k, v in batch.items()
    }


def sequence_multiple(cp: int, tp: int, sequence_parallel: bool) -> int:
    """What train.seq_length must be a multiple of: 2C chunks, each split over TP with
    sequence parallelism."""
    return 2 * cp * (tp if sequence_parallel else 1)


def check_context_parallel(cfg: Any, spec: Any, tp: int, kernels: str) -> None:
    """Refuse a CP layout that cannot run, naming the keys and numbers (no process group
    needed). `kernels` may still be `auto`: then the kernel-specific rules wait for the
    resolved choice (the trainer calls this again)."""
    par = cfg.parallel
    if par.cp_algo not in CP_ALGOS:
        raise ConfigError(
            f"parallel.cp_algo={par.cp_algo} is not one of {', '.join(CP_ALGOS)} (MindSpeed's "
            "hybrid_cp_algo is not supported yet)"
        )
    if par.cp_algo != "ulysses_cp_algo" and kernels not in ("mindspeed", "auto"):
        raise ConfigError(
            f"parallel.cp_algo={par.cp_algo} is MindSpeed's and needs kernels=mindspeed "
            f"(kernels={kernels}); the other kernels run Ulysses"
        )
    packed = bool(getattr(cfg.data, "packing", False))
    _check_layout(
        par.cp,
        tp,
        spec.num_attention_heads,
        spec.num_query_groups,
        cfg.train.seq_length,
        par.sequence_parallel,
        kernels,
        packed,
    )


def _check_layout(
    cp: int,
    tp: int,
    num_attention_heads: int,
    num_query_groups: int,
    seq_length: int,
    sequence_parallel: bool,
    kernels: str,
    packed: bool,
) -> None:
    if cp == 1:
        return
    multiple = sequence_multiple(cp, tp, sequence_parallel)
    if seq_length % multiple:
        what = f"2 x parallel.cp={cp}" + (f" x parallel.tp={tp}" if multiple != 2 * cp else "")
        raise ConfigError(
            f"train.seq_length={seq_length} must be a multiple of {what} = {multiple} (each "
            f"CP rank holds two equal chunks of every sequence); try train.seq_length="
            f"{-(-seq_length // multiple) * multiple}"
        )
    if kernels == "auto":
        return
    if kernels in ("te", "mindspeed"):
        if kernels == "te" and packed:
            raise ConfigError(
                "kernels=te with parallel.cp > 1 and data.packing=true is not supported "
                "(megatron-core's CP runs packed rows only in its THD layout); use kernels=sdpa"
            )
        return  # megatron-core's or MindSpeed's own CP checks its heads
    heads, groups = num_attention_heads // tp, num_query_groups // tp
    if heads % cp or (groups % cp and cp % groups):
        ok = [
            c
            for c in range(1, heads + 1)
            if heads % c == 0 and (groups % c == 0 or c % groups == 0)
        ]
        raise ConfigError(
            f"parallel.cp={cp} (Ulysses) splits each TP rank's heads over the CP ranks: it needs "
            f"the query heads per TP rank, num_attention_heads={num_attention_heads} / "
            f"parallel.tp={tp} = {heads}, to be a multiple of cp, and the kv heads per TP rank, "
            f"num_query_groups={num_query_groups} / parallel.tp={tp} = {groups}, to be a multiple "
            f"or a divisor of cp; try parallel.cp in {ok}, or a smaller parallel.tp"
        )


def layout_of(config: Any) -> str:
    """How the model built with this TransformerConfig wants a sequence laid over the CP ranks:
    MindSpeed copies its flags (`context_parallel_algo`) onto the config; everything else
    (mtrain's Ulysses, megatron-core's own CP) takes the balanced chunks."""
    return MINDSPEED_ALGOS.get(getattr(config, "context_parallel_algo", None), "balanced")
