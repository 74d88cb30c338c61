"""Progress lines, tensorboard scalars and the final summary of a training run.

FLOPs per trained token (forward + backward) are the standard 6N plus attention estimate:
6 * (matmul parameters: every linear layer and the output projection; the embedding lookup does
no matmul) + 12 * layers * seq_length * (heads * head_dim), the attention scores and their use on
the values, counted over the full (not causal) square as is customary.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field

from mtrain.errors import ConfigError
from mtrain.models.spec import ModelSpec

log = logging.getLogger("mtrain.train")


def flops_per_token(spec: ModelSpec, seq_length: int) -> float:
    """(MoE: the matmuls a token goes through, its router's top-k experts.)"""
    family, symbols = spec.family_table, spec.shape_symbols()
    layers = sum(
        family.layer_matmul_parameters(symbols, spec.is_moe_layer(i), spec.moe_router_topk)
        for i in range(spec.num_layers)
    )
    matmul_params = layers + family.output.numel(symbols)
    return 6 * matmul_params + 12 * spec.num_layers * seq_length * symbols["q"]


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


@dataclass
class Progress:
    """Accumulates step figures between progress lines and writes them out."""

    total_iters: int
    tokens_per_iter: int
    flops_per_iter: float
    devices: int
    peak_tflops: float | None
    interval: int
    tensorboard_dir: str | None = None
    metrics_file: str | None = None
    wandb_project: str | None = None
    run_config: dict | None = None  # recorded with the wandb run
    start_iter: int = 0
    _writer: object = None
    _wandb: object = None
    _t0: float = field(default_factory=time.perf_counter)
    _last: float = field(default_factory=time.perf_counter)
    _window_iters: int = 0
    _window_skipped: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self):
        if self.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.tensorboard_dir)
        if self.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    "log.wandb_project is set but wandb is not installed; pip install wandb"
                ) from None
            self._wandb = wandb.init(project=self.wandb_project, config=self.run_config or {})

    def step(self, iteration: int, metrics: dict[str, float], skipped: bool = False) -> None:
        """Record one finished iteration; every `interval` iterations, log a line."""
        self._window_iters += 1
        self._window_skipped += int(skipped)
        self.history.append({"iteration": iteration, **metrics})
        self._emit(iteration, self.history[-1], {f"train/{k}": v for k, v in metrics.items()})
        if iteration % self.interval and iteration != self.total_iters:
            return
        now = time.perf_counter()
        per_iter = (now - self._last) / self._window_iters
        tokens_s = self.tokens_per_iter / per_iter
        tflops = self.flops_per_iter / per_iter / self.devices / 1e12
        parts = [f"iter {iteration}/{self.total_iters}"]
        parts += [f"{k} {v:.4g}" for k, v in metrics.items()]
        parts += [f"{tokens_s:,.0f} tok/s", f"{tflops:.3g} TFLOP/s/dev"]
        if self.peak_tflops:
            parts.append(f"MFU {100 * tflops / self.peak_tflops:.1f}%")
        if self._window_skipped:
            parts.append(f"skipped {self._window_skipped}")
        done = iteration - self.start_iter
        eta = (now - self._t0) / max(done, 1) * (self.total_iters - iteration)
        parts += [f"elapsed {_fmt_time(now - self._t0)}", f"ETA {_fmt_time(eta)}"]
        log.info(" | ".join(parts))
        if self._writer is not None:
            self._writer.add_scalar("perf/tokens_per_s", tokens_s, iteration)
            self._writer.add_scalar("perf/tflops_per_device", tflops, iteration)
            self._writer.flush()
        self._last, self._window_iters, self._window_skipped = now, 0, 0

    def evaluation(self, iteration: int, metrics: dict[str, float]) -> None:
        """Log a validation result and send it to every sink, as eval/<name>."""
        log.info(
            "eval @ iter %d | %s", iteration, " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        )
        named = {f"eval/{k}": v for k, v in metrics.items()}
        self.evaluations.append({"iteration": iteration, **named})
        self._emit(iteration, self.evaluations[-1], named)

    def _emit(self, iteration: int, line: dict, scalars: dict[str, float]) -> None:
        """`line` to the metrics file; `scalars` to tensorboard and wandb."""
        if self.metrics_file:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(line) + "\n")
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, iteration)
        if self._wandb is not None:
            self._wandb.log(scalars, step=iteration)

    def summary(self) -> None:
        elapsed = time.perf_counter() - self._t0
        iters = len(self.history)
        if iters:
            losses = [h["loss"] for h in self.history if "loss" in h and math.isfinite(h["loss"])]
            log.info(
                "done: %d iterations in %s (%.2f s/iter); loss %.4g -> %.4g",
                iters,
                _fmt_time(elapsed),
                elapsed / iters,
                losses[0] if losses else float("nan"),
                losses[-1] if losses else float("nan"),
            )
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
