"""The `moe` config group: how a mixture-of-experts model routes and balances its tokens in
training (the model's own MoE shape comes from config.json). Ignored for dense models."""

from __future__ import annotations

from dataclasses import dataclass

from mtrain.errors import ConfigError


@dataclass
class MoeConfig:
    aux_loss_coef: float = 0.0  # load-balancing (switch) aux loss weight; 0 = off; see README MoE
    z_loss_coef: float = 0.0  # router z-loss weight (mean squared logsumexp of the logits); 0 = off
    capacity_factor: float | None = (
        None  # tokens an expert takes, x the even share; null = dropless
    )
    # A rank's experts as one grouped GEMM (megatron-core's GroupedMLP); kernels=mindspeed runs
    # it on MindSpeed's GMM (--moe-grouped-gemm). Checkpoints keep the per-expert names.
    grouped_gemm: bool = False

    def validate(self) -> MoeConfig:
        for key in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"moe.{key}={getattr(self, key)} must be >= 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(
                f"moe.capacity_factor={self.capacity_factor} must be positive, or null (dropless)"
            )
        return self
