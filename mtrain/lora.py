"""LoRA on megatron-core's tensor-parallel linears, laid out so that merging needs no communication.

A linear W (out x in) gets an update s * B A, with A (r x in), B (out x r), s = alpha / r
(alpha / sqrt(r) with rsLoRA). On each tensor-parallel rank t:

    column-parallel base (linear_qkv, linear_fc1), W_t = rows of W:
        A replicated, B_t = the same rows of B          ->  W_t + s * B_t A
    row-parallel base (linear_proj, linear_fc2), W_t = columns of W:
        A_t = the same columns of A, B replicated       ->  W_t + s * B A_t

so every rank merges its own shard. B's rows follow the base's rows, fused layouts included (the
GQA-interleaved qkv, the per-rank [gate; up] of fc1): converters split B exactly like the weight.

Forward communication (small: r features per token):
- column: u = A x is the same on every rank; `copy_to_tensor_model_parallel_region` all-reduces
  its gradient, so A and x get the sum of every rank's B_t^T g_t. With sequence parallelism x is
  this rank's tokens: u is gathered along the sequence instead, and A's gradient (from local
  tokens only) is all-reduced by megatron like a sequence-parallel norm weight.
- row: u_t = A_t x_t is a partial sum, all-reduced (reduce-scattered along the sequence with
  sequence parallelism, where B's gradient is then all-reduced like a norm weight).

Routed experts (MoE): the token dispatcher already gathers each expert's tokens over the expert
TP ranks and sums the outputs back, so an expert's linears do no communication, and neither do
their adapters; the replicated matrix's gradient is partial per rank and is all-reduced over TP
like a sequence-parallel weight; expert adapters are expert parameters (reduced over the
expert data-parallel group). Every expert of a layer gets its own adapter.

Adapters are child modules `lora_A` / `lora_B` of the linear they adapt, so their state-dict
names are the base's plus `.lora_A.weight` / `.lora_B.weight`; base names are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mtrain.config.lora import TARGETS, LoraConfig
from mtrain.errors import ConfigError
from mtrain.models.score import SCORE_KEY

ADAPTER_MARKERS = (".lora_A.", ".lora_B.")


def is_adapter_key(name: str) -> bool:
    """A tensor an adapter checkpoint holds: the LoRA matrices, and a reward model's score head
    (trained in full beside them and saved with them, as PEFT's `modules_to_save`)."""
    return any(marker in name for marker in ADAPTER_MARKERS) or name == SCORE_KEY


class _Weight(torch.nn.Module):
    """Holds one adapter matrix as `.weight` (names like PEFT's `lora_A.weight`)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)


@dataclass
class _Adapter:
    """Per-linear settings the forward hook reads."""

    mode: str  # "column" | "row"
    scaling: float
    dropout: float
    sequence_parallel: bool
    expert: bool = False  # a routed expert's linear: no communication (see the docstring)
    enabled: bool = True


def _parallel_mode(base: torch.nn.Module) -> str:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(base, ColumnParallelLinear):
        return "column"
    if isinstance(base, RowParallelLinear):
        return "row"
    mode = getattr(base, "parallel_mode", None)  # Transformer Engine linears
    if mode in ("column", "row"):
        return mode
    raise ConfigError(f"LoRA cannot adapt a {type(base).__name__}: not a tensor-parallel linear")


def _dropout(x: torch.Tensor, p: float, per_rank: bool, training: bool) -> torch.Tensor:
    """Dropout with a mask that is the same on every TP rank when they hold the same x (column
    without sequence parallelism), else drawn from megatron's per-rank stream."""
    if not training or p == 0.0:
        return x
    if not per_rank:
        return F.dropout(x, p, training=True)
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        return F.dropout(x, p, training=True)


def _forward_hook(module: torch.nn.Module, args: tuple, output: tuple):
    from megatron.core import tensor_parallel as tpl

    adapter: _Adapter = module.lora
    if not adapter.enabled:
        return output
    out, bias = output
    x, a, b = args[0], module.lora_A.weight, module.lora_B.weight
    sp = adapter.sequence_parallel
    if adapter.expert:
        x = _dropout(x, adapter.dropout, per_rank=adapter.mode == "row", training=module.training)
        return out + F.linear(F.linear(x, a), b) * adapter.scaling, bias
    if adapter.mode == "column":
        x = _dropout(x, adapter.dropout, per_rank=sp, training=module.training)
        u = F.linear(x, a)  # the same on every rank (for its own tokens with SP)
        if sp:
            u = tpl.gather_from_sequence_parallel_region(u)
        else:
            u = tpl.copy_to_tensor_model_parallel_region(u)  # sums the ranks' gradients
    else:
        x = _dropout(x, adapter.dropout, per_rank=True, training=module.training)
        u = F.linear(x, a)  # this rank's partial sum over the input features
        if sp:
            u = tpl.reduce_scatter_to_sequence_parallel_region(u)
        else:
            u = tpl.reduce_from_tensor_model_parallel_region(u)
    return out + F.linear(u, b) * adapter.scaling, bias


def _init_a(rows: int, cols: int, seed: int) -> torch.Tensor:
    """PEFT's default A init (nn.Linear's: uniform, bound 1/sqrt(fan_in)) from a generator of
    its own, over the *whole* matrix: the same adapters at every TP/PP layout."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


def attach_adapter(
    base: torch.nn.Module, cfg: LoraConfig, seed: int, sequence_parallel: bool
) -> None:
    """Give one tensor-parallel linear an adapter: A from `seed` (over the whole matrix, then
    this rank's part), B = 0, laid out and communicated as the module docstring says."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    expert = getattr(base, "is_expert", False)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if expert:
        tp, tp_rank = (
            ps.get_expert_tensor_parallel_world_size(),
            ps.get_expert_tensor_parallel_rank(),
        )
        sequence_parallel = False
    mode = _parallel_mode(base)
    rows, cols = base.weight.shape  # this rank's shard
    dtype, device = base.weight.dtype, base.weight.device
    a = _init_a(cfg.r, cols * tp if mode == "row" else cols, seed)
    if mode == "row":
        a = a.chunk(tp, dim=1)[tp_rank]
    # B: the base's rows on this rank (column), or all output rows (row).
    base.lora_A = _Weight(a.to(device=device, dtype=dtype).contiguous())
    base.lora_B = _Weight(torch.zeros(rows, cfg.r, device=device, dtype=dtype))
    split, replicated = base.lora_B.weight, base.lora_A.weight
    if mode == "row":
        split, replicated = replicated, split
    tensor_parallel.set_tensor_model_parallel_attributes(
        split, is_parallel=True, dim=0 if mode == "column" else 1, stride=1
    )
    if sequence_parallel or (expert and tp > 1):
        # Its gradient comes from this rank's tokens (or its shard) only: megatron all-reduces
        # it over TP.
        replicated.sequence_parallel = True
    if expert:
        for param in (base.lora_A.weight, base.lora_B.weight):
            param.allreduce = False  # megatron's mark of an expert-parallel parameter
    base.lora = _Adapter(mode, cfg.scaling, cfg.dropout, sequence_parallel, expert)
    base.register_forward_hook(_forward_hook)


def add_adapters(chunks: list[torch.nn.Module], cfg: LoraConfig, seed: int) -> tuple[int, int]:
    """Freeze every base parameter and give each target linear an adapter (B = 0, so the model
    is unchanged until trained). Returns (trainable, total) parameter counts of this rank.

    Must run before DDP and the optimizer are built: both only take trainable parameters.
    """
    cfg.validate()
    for chunk in chunks:
        for param in chunk.parameters():
            param.requires_grad_(False)
        for layer in chunk.decoder.layers:
            global_layer = layer.layer_number - 1
            for name, module in layer.named_modules():
                target = name.rsplit(".", 1)[-1]
                if target not in cfg.target_modules:
                    continue
                attach_adapter(
                    module,
                    cfg,
                    seed=seed * 1_000_003
                    + global_layer * 16
                    + TARGETS.index(target)
                    + 100_003 * (_global_expert(name, chunk.config) + 1),
                    sequence_parallel=chunk.config.sequence_parallel,
                )
    total = sum(p.numel() for c in chunks for p in c.parameters())
    trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    return trainable, total


def _global_expert(module_name: str, config) -> int:
    """The model-wide number of the routed expert `module_name` belongs to; -1 for the rest. An
    expert's adapters draw from its own seed, the same at every expert-parallel layout."""
    if ".local_experts." not in module_name:
        return -1
    from megatron.core import parallel_state as ps

    local = int(module_name.split(".local_experts.")[1].split(".")[0])
    per_rank = config.num_moe_experts // ps.get_expert_model_parallel_world_size()
    return ps.get_expert_model_parallel_rank() * per_rank + local


def _adapters(chunks: list[torch.nn.Module]) -> Iterator[_Adapter]:
    for chunk in chunks:
        for module in chunk.modules():
            adapter = getattr(module, "lora", None)
            if isinstance(adapter, _Adapter):
                yield adapter


@contextmanager
def adapters_disabled(chunks: list[torch.nn.Module]):
    """The base model, adapters bypassed (e.g. DPO's reference model, at no extra memory)."""
    adapters = list(_adapters(chunks))
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.enabled = True


def adapter_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if is_adapter_key(k)}


def merged_weight(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, block_rows: int = 1024
) -> torch.Tensor:
    """W + s * B A, computed in fp32 and returned in W's dtype (one TP shard or a whole HF
    tensor: the layout above makes both the same formula). Row blocks through one reused fp32
    buffer bound the extra memory (fresh allocations per block cost more than the math)."""
    out = torch.empty(weight.shape, dtype=weight.dtype)
    a32, b32 = a.float(), b.float()
    block = torch.empty(min(block_rows, weight.shape[0]), weight.shape[1], dtype=torch.float32)
    for start in range(0, weight.shape[0], block_rows):
        rows = slice(start, start + block_rows)
        acc = block[: weight[rows].shape[0]]
        acc.copy_(weight[rows]).addmm_(b32[rows], a32, alpha=scaling)
        out[rows] = acc
    return out
