"""Step time of mtrain's training loop divided by a bare megatron-core loop (target <= 1.05).

    python bench/step_overhead.py [--steps 30] [--device cpu]

Both loops train the same model on the same fixed batch in their own process: the bare loop is
the minimum megatron-core needs (zero grads, forward_backward_func, optimizer.step,
scheduler.step); mtrain's is `mtrain.trainer.train` with everything it does per step (metric
reduction, NaN checks, progress, preemption check). A step is timed from the first micro-batch
drawn to the first micro-batch of the next step, so every per-step overhead is inside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtrain.config.model import ModelConfig  # noqa: E402
from mtrain.models.spec import ModelSpec  # noqa: E402

SPEC = ModelSpec(
    family="qwen3",
    num_layers=4,
    hidden_size=512,
    ffn_hidden_size=1408,
    num_attention_heads=8,
    num_query_groups=4,
    kv_channels=64,
    vocab_size=4096,
    max_position_embeddings=1024,
    rope_theta=1e6,
    norm_epsilon=1e-6,
    tie_word_embeddings=False,
)
SEQ, MBS, GBS = 256, 2, 8


def timed_batches(stamps: list[float]):
    """The same fixed micro-batch forever; stamps the start of every step."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SPEC.vocab_size, (MBS, SEQ + 1), generator=generator)
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(MBS, SEQ),
        "position_ids": torch.arange(SEQ).expand(MBS, SEQ),
    }
    drawn = 0
    while True:
        if drawn % (GBS // MBS) == 0:
            stamps.append(time.perf_counter())
        drawn += 1
        yield batch


def run_mtrain(steps: int, device: str) -> list[float]:
    from mtrain.config.schema import TrainingCommandConfig
    from mtrain.losses import lm_loss
    from mtrain.trainer import Task, train

    model = ModelConfig(**{f.name: getattr(SPEC, f.name) for f in fields(ModelSpec)}, name="bench")
    cfg = TrainingCommandConfig(model=model, device=device)
    cfg.data.path = "unused"
    cfg.parallel.tp = cfg.parallel.pp = 1
    t = cfg.train
    t.iters, t.seq_length, t.micro_batch_size, t.global_batch_size = steps, SEQ, MBS, GBS
    t.precision, t.lr = "fp32", 1e-4
    cfg.log.interval = steps
    stamps: list[float] = []
    train(cfg, lambda c, layout: Task("bench", lambda *a: timed_batches(stamps), lm_loss))
    return stamps


def run_bare(steps: int, device: str) -> list[float]:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mtrain import accel, parallel
    from mtrain.models.provider import BuildOptions, build_model_chunks

    accel.activate(device)
    parallel.init(1, 1)
    chunk = build_model_chunks(SPEC, BuildOptions(extra={"calculate_per_token_loss": True}))[0]
    chunk = chunk.to(accel.device())
    model = [
        DistributedDataParallel(
            config=chunk.config,
            module=chunk,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        )
    ]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, min_lr=0.0, clip_grad=1.0), model
    )
    scheduler = OptimizerParamScheduler(
        optimizer, 1e-4, 1e-4, 0.0, 0, steps, "cosine", 0.0, 0.0, steps, "constant"
    )
    chunk.config.finalize_model_grads_func = finalize_model_grads
    chunk.config.no_sync_func = model[0].no_sync
    stamps: list[float] = []
    batches = timed_batches(stamps)

    def forward_step(data_iterator, m):
        b = {k: v.to(accel.device()) for k, v in next(data_iterator).items()}
        out = m(b["tokens"], b["position_ids"], attention_mask=None, labels=b["labels"])

        def loss(o):
            total = (o.float() * b["loss_mask"]).sum()
            return total, b["loss_mask"].sum().int(), {"loss": total.detach()}

        return out, loss

    fb = get_forward_backward_func()
    for _ in range(steps):
        model[0].zero_grad_buffer()
        optimizer.zero_grad()
        fb(
            forward_step_func=forward_step,
            data_iterator=batches,
            model=model,
            num_microbatches=GBS // MBS,
            seq_length=SEQ,
            micro_batch_size=MBS,
            forward_only=False,
        )
        optimizer.step()
        scheduler.step(increment=1)
    next(batches)  # closes the last step
    return stamps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=["mtrain", "bare"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # child process
        run = run_mtrain if args.mode == "mtrain" else run_bare
        print(json.dumps(run(args.steps, args.device)))
        return
    results = {}
    for mode in ("bare", "mtrain", "bare", "mtrain"):  # interleaved, against drift
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--mode",
                mode,
                "--steps",
                str(args.steps),
                "--device",
                args.device,
            ],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        stamps = json.loads(out.stdout.strip().splitlines()[-1])
        times = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup :]
        results.setdefault(mode, []).extend(times)
    bare = statistics.median(results["bare"])
    ours = statistics.median(results["mtrain"])
    print(
        f"model: {SPEC.num_parameters() / 1e6:.1f} M parameters, seq {SEQ}, micro-batch {MBS}, "
        f"global batch {GBS}, fp32, device {args.device}, median of "
        f"{len(results['bare'])} steps each"
    )
    print(f"bare megatron-core loop  {bare * 1e3:8.1f} ms/step")
    print(f"mtrain loop              {ours * 1e3:8.1f} ms/step")
    print(f"ratio mtrain / bare      {ours / bare:8.3f}   (target <= 1.05)")


if __name__ == "__main__":
    main()
