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


def _expert(w: torch.Tensor, which: str, num_local: int, j: int) -> torch.Tensor:
    """Expert j's fc1 [2F/TP, H] or fc2 [H, F/TP] weight inside a grouped weight (a view)."""
    if which == "1":
        return w.view(num_local, w.shape[0], -1)[j].t()
    return w.view(num_local, -1, w.shape[1])[j].t()


def _grouped(which: str, matrices: list[torch.Tensor]) -> torch.Tensor:
    """The grouped weight1 / weight2 of the experts' fc1 / fc2 weights, in expert order."""
    stacked = torch.stack([m.t() for m in matrices])
    if which == "1":
        return stacked.reshape(stacked.shape[1], -1)
    return stacked.reshape(-1, stacked.shape[2])


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
            out[key] = _grouped(_FC[fc], [experts[i] for i in range(num_local)])
    if pending:
        raise ValueError(f"experts of {sorted(pending)[0]} are incomplete (need {num_local})")
    return out


def present_sequential_names(model: torch.nn.Module) -> None:
    """Make a model whose MoE layers run GroupedMLP save and load SequentialMLP's per-expert
    names (`mlp.experts.local_experts.{j}.linear_fc1.weight`, ...), as kernels=te presents the
    local spec's: its checkpoints, HF loading and export, and LoRA-free resumes then work as for
    the sequential experts, bit-exact. `state_dict()` gives each expert's matrix as a copy
    (`keep_vars=True`: a view into the grouped parameter, so writing it fills the parameter);
    `load_state_dict()` stacks the per-expert matrices back into weight1 / weight2."""
    for module in model.modules():
        if isinstance(getattr(module, "weight1", None), torch.nn.Parameter) and hasattr(
            module, "num_local_experts"
        ):
            module._register_state_dict_hook(_save_sequential)
            module._register_load_state_dict_pre_hook(_load_sequential, with_module=True)


def _save_sequential(module, state, prefix, local_metadata) -> None:
    """SequentialMLP's entries, in its order: each expert's fc1 then fc2, each weight followed
    by its linear's `_extra_state` (None, as megatron-core's local linears save it)."""
    grouped = {which: state.pop(f"{prefix}weight{which}") for which in "12"}
    for j in range(module.num_local_experts):
        for which, fc in (("1", "linear_fc1"), ("2", "linear_fc2")):
            w = grouped[which]
            view = _expert(w.detach(), which, module.num_local_experts, j)
            keep_vars = isinstance(w, torch.nn.Parameter)
            state[f"{prefix}local_experts.{j}.{fc}.weight"] = (
                view if keep_vars else view.contiguous()
            )
            state[f"{prefix}local_experts.{j}.{fc}._extra_state"] = None


def _load_sequential(module, state, prefix, *args) -> None:
    for which, fc in (("1", "linear_fc1"), ("2", "linear_fc2")):
        names = [f"{prefix}local_experts.{j}.{fc}.weight" for j in range(module.num_local_experts)]
        for j in range(module.num_local_experts):  # the per-expert linears' (None) extra state
            state.pop(f"{prefix}local_experts.{j}.{fc}._extra_state", None)
        if all(n in state for n in names):  # else load_state_dict names what is missing
            state[f"{prefix}weight{which}"] = _grouped(which, [state.pop(n) for n in names])


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
        return _expert(self.state[grouped], grouped[-1], self.num_local, j).contiguous()

    def __iter__(self) -> Iterator[str]:
        yield from (n for n in self.state if not _GROUPED.match(n))
        yield from self._names

    def __len__(self) -> int:
        return sum(1 for _ in self)
