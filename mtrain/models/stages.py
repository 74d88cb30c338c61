"""Which Megatron tensors live on which pipeline stage, and which HF tensors they come from.

With PP stages and V virtual chunks per stage, the model is cut into PP*V pieces of
L/(PP*V) layers each; chunk c of pipeline rank p is piece `c*PP + p` (Megatron's interleaved
order). Layer indices in the state dict are local to the piece and start at 0. The embedding is
on the first piece and the final norm and output layer on the last; with tied embeddings and more
than one piece, the last piece still holds `output_layer.weight`, a copy of the embedding.

Mixture of experts: with EP expert-parallel ranks, rank r holds experts [r*E/EP, (r+1)*E/EP) of
every MoE layer, numbered from 0 on the rank (`local_experts.{j}`); every other tensor is on
every EP rank. `ep_rank=None` lists the tensors of all EP ranks, each expert's tagged with the
rank that holds it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from mtrain.models.families.base import (
    HF_EXPERT_PREFIX,
    HF_LAYER_PREFIX,
    MCORE_EXPERT_PREFIX,
    MCORE_LAYER_PREFIX,
    Entry,
)
from mtrain.models.spec import ModelSpec


@dataclass(frozen=True)
class Planned:
    mcore: str  # full Megatron state-dict name on this stage
    hf: list[str]  # full HF names, in the entry's order
    entry: Entry
    ep_rank: int | None = None  # a routed expert's: the expert-parallel rank that holds it


def piece_layers(spec: ModelSpec, pp: int, vpp: int, pp_rank: int, chunk: int) -> range:
    per_piece = spec.num_layers // (pp * vpp)
    start = (chunk * pp + pp_rank) * per_piece
    return range(start, start + per_piece)


def stage_groups(
    spec: ModelSpec,
    pp: int,
    vpp: int,
    pp_rank: int,
    chunk: int,
    ep: int = 1,
    ep_rank: int | None = 0,
    *,
    head: str = "lm",
) -> Iterator[list[Planned]]:
    """The tensors of one piece on EP rank `ep_rank` (None: on any), grouped so that each group
    is one layer (or the embedding, or the head): a converter that holds one group at a time
    holds one layer at a time. `head` is `lm` (the output layer) or `score` (a reward model's
    scalar head, never tied)."""
    family = spec.family_table
    first = pp_rank == 0 and chunk == 0
    last = pp_rank == pp - 1 and chunk == vpp - 1
    if first:
        yield [Planned(family.embedding.mcore, list(family.embedding.hf), family.embedding)]
    for local, layer in enumerate(piece_layers(spec, pp, vpp, pp_rank, chunk)):
        m_prefix = MCORE_LAYER_PREFIX.format(i=local)
        h_prefix = HF_LAYER_PREFIX.format(i=layer)
        if not spec.is_moe_layer(layer):
            yield [
                Planned(m_prefix + e.mcore, [h_prefix + n for n in e.hf], e) for e in family.layer
            ]
            continue
        group = [
            Planned(m_prefix + e.mcore, [h_prefix + n for n in e.hf], e) for e in family.moe_layer
        ]
        per_rank = spec.num_experts // ep
        for rank in range(ep) if ep_rank is None else [ep_rank]:
            for j in range(per_rank):
                m_expert = m_prefix + MCORE_EXPERT_PREFIX.format(j=j)
                h_expert = h_prefix + HF_EXPERT_PREFIX.format(e=rank * per_rank + j)
                group += [
                    Planned(m_expert + e.mcore, [h_expert + n for n in e.hf], e, rank)
                    for e in family.expert
                ]
        yield group
    if last:
        group = [Planned(family.final_norm.mcore, list(family.final_norm.hf), family.final_norm)]
        if head == "score":
            group.append(Planned(family.score.mcore, list(family.score.hf), family.score))
        elif not spec.tie_word_embeddings:
            group.append(Planned(family.output.mcore, list(family.output.hf), family.output))
        elif not first:
            group.append(Planned(family.output.mcore, list(family.embedding.hf), family.output))
        yield group


def all_hf_tensors(spec: ModelSpec, head: str = "lm") -> dict[str, tuple[Entry, int]]:
    """Every HF tensor the model has: name -> (entry, position in entry.hf)."""
    out: dict[str, tuple[Entry, int]] = {}
    for group in stage_groups(spec, 1, 1, 0, 0, ep=1, ep_rank=0, head=head):
        for planned in group:
            for pos, name in enumerate(planned.hf):
                out[name] = (planned.entry, pos)
    return out
