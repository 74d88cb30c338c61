"""Per-step MoE metrics for the progress line: megatron-core's router losses and how evenly
the routers spread the tokens over the experts.

- `moe_aux_loss` / `moe_z_loss`: the load-balancing and z-loss values (without their
  coefficients), mean over MoE layers, micro-batches and data-parallel ranks, as megatron-core's
  routers record them in its tracker.
- `expert_load_max`: tokens of the busiest expert / tokens of the average expert, over every
  MoE layer of the model (1.0 is perfectly balanced; the top-k choices of all tokens of the step,
  on all ranks, counted by hooks on the routers).
"""

from __future__ import annotations

import torch

from mtrain import parallel
from mtrain.models.spec import ModelSpec


class MoeMetrics:
    """Counts routed tokens during training passes; `collect` turns a step into metrics."""

    def __init__(self, chunks: list[torch.nn.Module], spec: ModelSpec, device: torch.device):
        from megatron.core.transformer.moe.router import TopKRouter

        self.spec = spec
        self.counts = torch.zeros(spec.num_layers, spec.num_experts, device=device)
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        if module.training and torch.is_grad_enabled():
            _, routing_map = output
            self.counts[module.layer_number - 1] += routing_map.sum(dim=0).to(self.counts.dtype)

    def collect(self, micro_batches: int) -> dict[str, float]:
        """This step's metrics, the same on every rank (collective); resets the counts."""
        from megatron.core import parallel_state
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        counts = self.counts.clone()
        torch.distributed.all_reduce(counts)  # layers: over PP; tokens: over TP (SP) and DP
        self.counts.zero_()
        moe_layers = [i for i in range(self.spec.num_layers) if self.spec.is_moe_layer(i)]
        load = counts[moe_layers]
        out = {"expert_load_max": (load.max(dim=1).values / load.mean(dim=1)).max().item()}
        tracker = parallel_state.get_moe_layer_wise_logging_tracker()
        for name, key, over_tp in (
            ("load_balancing_loss", "moe_aux_loss", True),
            ("z_loss", "moe_z_loss", False),
        ):
            present = torch.tensor([float(name in tracker)], device=counts.device)
            torch.distributed.all_reduce(present)
            if not present.item():
                continue
            values = (
                tracker[name]["values"].clone()
                if name in tracker
                else counts.new_zeros(self.spec.num_layers)
            )
            torch.distributed.all_reduce(values, group=parallel.pp_group())
            if parallel.tp_size() > 1:  # partial sums over each TP rank's tokens (SP) ...
                torch.distributed.all_reduce(values, group=parallel.tp_group())
                values = values if over_tp else values / parallel.tp_size()  # ... or means
            torch.distributed.all_reduce(values, group=parallel.dp_group())
            values = values / (parallel.dp_size() * micro_batches)
            out[key] = values[moe_layers].mean().item()
        clear_aux_losses_tracker()
        return out
