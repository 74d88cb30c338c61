"""The two ways a Megatron checkpoint stores the routed experts of one EP rank in an MoE layer.

- sequential (megatron-core's SequentialMLP, the local spec): one MLP per expert,
  `mlp.experts.local_experts.{j}.linear_fc1.weight` [2F/TP, H] (gate and up fused per TP rank as
  in the dense MLP) and `...linear_fc2.weight` [H, F/TP].
- grouped (GroupedMLP, what grouped-GEMM kernels such as MindSpeed's `--moe-grouped-gemm` train
  on): `mlp.experts.weight1` [H, E*2F/TP] whose memory is the E matrices fc1_j^T [H, 2F/TP] one
  after the other (GroupedMLP reads it as `weight1.view(E, H, -1)`), and `mlp.experts.weight2`
  [E*F/TP, H], the E matrices fc2_j^T [F/TP, H] (`weight2.view(E, -1, H)`).

Both hold the same numbers; converting either way is a transpose and a copy, bit-exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch

_SEQUENTIAL = re.compile(r"(.*\.mlp\.experts\.)local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_GROUPED = re.compile(r"(.*\.mlp\.experts\.)weight([12])$")
_FC = {"linear_fc1": "1", "linear_fc2": "2"}


def group_experts(state: dict[str, torch.Tensor], num_local: int) -> dict[str, torch.Tensor]:
    """A sequential-layout state dict in the grouped layout (other tensors unchanged)."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        match = _SEQUENTIAL.match(name)
        if match is None:
            out[name] = tensor
            continue
        prefix, j, fc = match.groups()
        key = f"{prefix}weight{_FC[fc]}"
        pending.setdefault(key, {})[int(j)] = tensor
        if len(pending[key]) == num_local:
            experts = pending.pop(key)
            stacked = torch.stack([experts[i].t() for i in range(num_local)])
            out[key] = (
                stacked.reshape(stacked.shape[1], -1)
                if fc == "linear_fc1"
                else (stacked.reshape(-1, stacked.shape[2]))
            )
    if pending:
        raise ValueError(f"experts of {sorted(pending)[0]} are incomplete (need {num_local})")
    return out


class SequentialExperts(Mapping):
    """A grouped-layout state dict read under the sequential names (one expert's matrix is
    materialised only when asked for)."""

    def __init__(self, state: Mapping[str, torch.Tensor], num_local: int):
        self.state, self.num_local = state, num_local
        self._names: dict[str, tuple[str, int]] = {}
        for name in state:
            match = _GROUPED.match(name)
            if match is None:
                continue
            prefix, which = match.groups()
            fc = "linear_fc1" if which == "1" else "linear_fc2"
            for j in range(num_local):
                self._names[f"{prefix}local_experts.{j}.{fc}.weight"] = (name, j)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            if _GROUPED.match(name):
                raise KeyError(name)
            return self.state[name]
        grouped, j = self._names[name]
        w = self.state[grouped]
        if grouped.endswith("1"):
            return w.view(self.num_local, w.shape[0], -1)[j].t().contiguous()
        return w.view(self.num_local, -1, w.shape[1])[j].t().contiguous()

    def __iter__(self) -> Iterator[str]:
        yield from (n for n in self.state if not _GROUPED.match(n))
        yield from self._names

    def __len__(self) -> int:
        return sum(1 for _ in self)
