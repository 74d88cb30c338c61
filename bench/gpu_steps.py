"""The training steps bench/gpu.py times: mtrain's (per `kernels=`, packed, LoRA) and plain HF's.

Each builder returns a `Step` whose `run()` is one optimizer step over `micro_batches`
micro-batches of one fixed batch that already sits on the device.

mtrain's step is built from the functions mtrain's trainer builds and runs it with
(mtrain/trainer.py `_build` and the body of its loop): `build_model_chunks` with the
`kernels=` choice, `add_adapters` for LoRA, `wrap_ddp` (fp32 gradient buffers),
`build_optimizer` (megatron's mixed-precision Adam: fp32 master weights and moments, gradient
clipping at 1.0), `connect_schedule`, and per step zero_grad_buffer, zero_grad, `run_schedule`
(megatron's schedule over the micro-batches, mtrain's per-token loss and metric reduction),
`optimizer.step()`, `scheduler.step()`. Two differences, both outside the timed step: the
weights are drawn on the device (`seed_init_on_cpu=False`; random either way, and it saves the
serial CPU init of several GB per build), and the loop's per-step bookkeeping (NaN checks, the
progress line, the SIGTERM check) is left out: bench/step_overhead.py measures that at <= 5%.

The HF step is what LLaMA-Factory's and ms-swift's default paths run, without their gradient
checkpointing (mtrain runs without recomputation here too): `Qwen3ForCausalLM` from the same
shape, sdpa attention, bf16 weights, gradients and AdamW states (a model loaded in bf16),
`torch.optim.AdamW` fused where torch has it, loss from `model(input_ids, labels=...)`,
gradient accumulation over the same micro-batches, clipping at 1.0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mtrain import accel, compat
from mtrain.config.schema import TrainingCommandConfig
from mtrain.data.packing import block_causal_mask, sequence
from mtrain.kernels import check, for_finetuning
from mtrain.lora import add_adapters
from mtrain.losses import lm_forward, lm_loss
from mtrain.models.provider import BuildOptions, build_model_chunks
from mtrain.models.spec import ModelSpec, hf_config_from_spec
from mtrain.optim import build_optimizer, connect_schedule, wrap_ddp
from mtrain.schedule import means, run_schedule

SEED = 1234
Batch = dict[str, torch.Tensor]


@dataclass
class Step:
    run: Callable[[], None]  # one optimizer step
    parameters: int  # in the model
    trained: int  # of them trained
    optimizer: str  # what updates them
    kernels: str  # the layers that ran (HF: its attention implementation)


@dataclass(frozen=True)
class Batches:
    """One training batch's shape: `micro_batches` micro-batches of `micro_batch_size` rows."""

    seq: int
    micro_batch_size: int
    micro_batches: int
    segments: int = 1  # samples per row: > 1 packs them (block-causal attention)

    @property
    def tokens(self) -> int:
        return self.seq * self.micro_batch_size * self.micro_batches


def make_batch(vocab: int, shape: Batches, seed: int = 0) -> Batch:
    """One micro-batch on the CPU: causal rows, or rows of `segments` packed samples in
    mtrain.data.packing's row format (with their cu_seqlens)."""
    rng = np.random.default_rng(seed)
    b, s = shape.micro_batch_size, shape.seq
    if shape.segments == 1:
        tokens = torch.from_numpy(rng.integers(0, vocab, (b, s + 1)))
        return {
            "tokens": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, s),
            "position_ids": torch.arange(s).expand(b, s).contiguous(),
        }
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(1, s), shape.segments - 1, replace=False))
        lengths = np.diff(np.concatenate([[0], cuts, [s]]))
        samples = [(rng.integers(0, vocab, n), np.ones(n, dtype=np.int64)) for n in lengths]
        rows.append(sequence(samples, s, pad_id=0, cu_len=shape.segments + 1))
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _count(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _optimizer_name(opt: torch.optim.Optimizer) -> str:
    """E.g. `torch.AdamW (fused)`; torch's own choice (foreach on CUDA) when none was asked."""
    how = next((k for k in ("fused", "foreach") if opt.defaults.get(k)), "torch's default")
    return f"{type(opt).__module__.split('.')[0]}.{type(opt).__name__} ({how})"


def mtrain_step(
    spec: ModelSpec, kernels: str, shape: Batches, lora: bool = False, iters: int = 1000
) -> Step:
    """mtrain's training step (module docstring) for `kernels`; packed rows when
    shape.segments > 1, LoRA adapters (mtrain's default lora.* keys) when `lora`."""
    cfg = TrainingCommandConfig()
    cfg.finetuning_type = "lora" if lora else "full"
    cfg.train.iters, cfg.train.seq_length = iters, shape.seq
    cfg.train.micro_batch_size = shape.micro_batch_size
    if lora:
        kernels = for_finetuning(kernels, cfg)  # te -> sdpa, as a LoRA run with kernels=auto
    packed = shape.segments > 1
    opts = BuildOptions(
        precision=cfg.train.precision,
        kernels=kernels,
        explicit_attention_mask=packed,
        seed_init_on_cpu=accel.current().NAME == "cpu",
        extra={"calculate_per_token_loss": True},
    )
    check(kernels, opts.npu, sequence_parallel=False)
    torch.manual_seed(SEED)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    chunks = [c.to(accel.device()) for c in build_model_chunks(spec, opts)]
    if lora:
        add_adapters(chunks, cfg.lora, SEED)
    parameters, trained = _count(chunks[0])
    model = wrap_ddp(chunks, cfg.parallel)
    if lora:
        compat.keep_frozen_tied_embedding_reducible(model)
    optimizer, scheduler = build_optimizer(model, cfg.train, cfg.parallel.distributed_optimizer)
    connect_schedule(model, optimizer)

    batch = make_batch(spec.vocab_size, shape)
    if packed:  # what mtrain's SFT data hands these kernels (mtrain/sft.py)
        cu = batch.pop("cu_seqlens")
        batch["attention_mask"] = cu if opts.cu_seqlens_masks else block_causal_mask(cu, shape.seq)
    else:
        batch.pop("cu_seqlens", None)
    batch = {k: v.to(accel.device()) for k, v in batch.items()}

    def forever():
        while True:
            yield batch

    iterators = [forever()]

    def run() -> None:
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        sums = run_schedule(
            model,
            iterators,
            lm_forward,
            lm_loss,
            shape.micro_batches,
            shape.seq,
            shape.micro_batch_size,
            forward_only=False,
        )
        means(sums)  # the loop reads the metrics every step
        ok, _, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)

    inner = getattr(optimizer, "optimizer", optimizer)
    return Step(run, parameters, trained, "megatron " + _optimizer_name(inner), kernels)


def hf_model(spec: ModelSpec, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """`spec` as a transformers model with random weights, built on the active device."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    raw = hf_config_from_spec(spec)
    config = CONFIG_MAPPING[raw.pop("model_type")](**raw)
    config.use_cache = False  # training keeps no KV cache (LLaMA-Factory sets the same)
    with torch.device(accel.device()):
        torch.manual_seed(SEED)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def adamw(params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float], eps: float):
    """torch's AdamW, fused where this torch has a fused kernel for the device, else foreach."""
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)


def hf_step(spec: ModelSpec, shape: Batches) -> Step:
    """Plain transformers + torch AdamW on the same model and batch (module docstring)."""
    tr = TrainingCommandConfig().train  # mtrain's optimizer defaults, for both sides
    model = hf_model(spec)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    parameters, trained = _count(model)
    opt = adamw(params, tr.lr, (tr.adam_beta1, tr.adam_beta2), tr.adam_eps)
    tokens = make_batch(spec.vocab_size, shape)["tokens"].to(accel.device())

    def run() -> None:
        for _ in range(shape.micro_batches):
            loss = model(input_ids=tokens, labels=tokens).loss
            (loss / shape.micro_batches).backward()
        torch.nn.utils.clip_grad_norm_(params, tr.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Step(run, parameters, trained, _optimizer_name(opt), model.config._attn_implementation)
