"""DDP wrapping, the optimizer and the learning-rate schedule: megatron-core's, built from the
run's `train.*` and `parallel.*` keys. One of the named seams to megatron-core."""

from __future__ import annotations

from typing import Any

from mtrain import compat
from mtrain.dtypes import DTYPES


def wrap_ddp(chunks: list, parallel: Any) -> list:
    """megatron's DistributedDataParallel around each model chunk (fp32 gradient buffers)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        use_distributed_optimizer=parallel.distributed_optimizer,
    )
    return [
        DistributedDataParallel(
            config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0
        )
        for i, c in enumerate(chunks)
    ]


def build_optimizer(model: list, tr: Any, distributed: bool):
    """megatron's Adam (mixed precision from train.precision) and its parameter scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if distributed:
        compat.tolerate_empty_fp8_quantization()
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=tr.lr,
            min_lr=tr.min_lr,
            weight_decay=tr.weight_decay,
            adam_beta1=tr.adam_beta1,
            adam_beta2=tr.adam_beta2,
            adam_eps=tr.adam_eps,
            clip_grad=tr.clip_grad,
            bf16=tr.precision == "bf16",
            fp16=tr.precision == "fp16",
            params_dtype=DTYPES[tr.precision],
            use_distributed_optimizer=distributed,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if tr.warmup_iters else tr.lr,
        max_lr=tr.lr,
        min_lr=tr.min_lr,
        lr_warmup_steps=tr.warmup_iters,
        lr_decay_steps=tr.iters,
        lr_decay_style=tr.decay_style,
        start_wd=tr.weight_decay,
        end_wd=tr.weight_decay,
        wd_incr_steps=tr.iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def connect_schedule(model: list, optimizer) -> None:
    """Tell megatron's pipeline schedule how to finish gradients, scale the loss and defer the
    DP gradient reduction of every chunk."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(model[0])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [m.no_sync for m in model]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
