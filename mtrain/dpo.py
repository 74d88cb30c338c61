"""`python -m mtrain.dpo +model=qwen3_8b model.hf_dir=HF load=CKPT save=OUT data.path=pairs.jsonl`

Direct Preference Optimization on the shared loop: pairs of a prompt with a chosen and a
rejected response (alpaca, sharegpt or OpenAI layouts), rendered with the chat template; the
loss compares the policy's and a reference's log-probs of both responses (mtrain/losses.py).
The reference (`dpo.reference`) is precomputed once by default (mtrain/reference.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from mtrain import parallel
from mtrain.cli import hydra_command
from mtrain.config.data import DataConfig
from mtrain.config.dpo_data import DPODataConfig
from mtrain.config.schema import TrainingCommandConfig, iters_for_epochs
from mtrain.data.epochs import Epochs
from mtrain.data.pairs import build_pair_datasets
from mtrain.data.sampler import micro_batches
from mtrain.dry_run import describe_plan
from mtrain.errors import ConfigError
from mtrain.losses import DPO_LOSSES, make_dpo_loss, pair_forward
from mtrain.trainer import Setup, Task, train

log = logging.getLogger("mtrain.dpo")
REFERENCES = ("precompute", "model")


@dataclass
class DPOSettings:
    beta: float = 0.1  # strength of the pull towards the reference (the KL weight)
    loss: str = "sigmoid"  # sigmoid | ipo | hinge
    label_smoothing: float = 0.0  # sigmoid only: assumed fraction of flipped preference labels
    sft_weight: float = 0.0  # add this times the chosen response's mean token NLL
    # precompute: log-probs of the starting model, once, cached next to the data | model: a
    # frozen copy run every step (with finetuning_type=lora: the policy with adapters off)
    reference: str = "precompute"

    def validate(self) -> DPOSettings:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta={self.beta} must be positive")
        if self.loss not in DPO_LOSSES:
            raise ConfigError(f"dpo.loss={self.loss} is not one of {', '.join(DPO_LOSSES)}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"dpo.label_smoothing applies to dpo.loss=sigmoid, not {self.loss}")
        if self.sft_weight < 0:
            raise ConfigError(f"dpo.sft_weight={self.sft_weight} must be >= 0")
        if self.reference not in REFERENCES:
            raise ConfigError(
                f"dpo.reference={self.reference} is not one of {', '.join(REFERENCES)}"
            )
        return self


@dataclass
class DPOConfig(TrainingCommandConfig):
    """DPO: the shared training config with preference pairs (`data.*`) and `dpo.*`.
    `train.micro_batch_size` and `train.global_batch_size` count pairs."""

    data: DPODataConfig = field(default_factory=DPODataConfig)
    dpo: DPOSettings = field(default_factory=DPOSettings)


def data_fingerprint(cfg: DPOConfig, pairs: int) -> dict:
    """What decides the pairs and their tokens: data settings, files (size and time), tokenizer,
    sequence length and order."""
    from omegaconf import OmegaConf

    files = [
        (str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns)
        for p in cfg.data.paths()
    ]
    settings = OmegaConf.to_container(OmegaConf.structured(cfg.data))
    for key in ("cache_dir", "workers"):  # where and how fast, not what: same pairs, same cache
        settings.pop(key, None)
    return {
        "data": settings,
        "files": files,
        "tokenizer": str(Path(cfg.model.hf_dir).resolve()),
        "seq_length": cfg.train.seq_length,
        "seed": cfg.train.seed,
        "pairs": pairs,
        "precision": cfg.train.precision,
    }


def make_dpo_task(cfg: DPOConfig, setup: Setup) -> Task:
    from mtrain import reference

    settings, tr = cfg.dpo, cfg.train
    cfg.model.tokenizer_dir("DPO renders and tokenizes the pairs with the model's HF tokenizer")
    if cfg.load is None:
        raise ConfigError("DPO needs load=CKPT_DIR: the starting model, also the reference")
    data = cfg.data
    if data.val_ratio or data.val_path is not None:
        raise ConfigError("data.val_ratio / data.val_path: validation is not available for DPO yet")
    train_set, _ = parallel.cluster_first(
        lambda: build_pair_datasets(data, cfg.model.hf_dir, tr.seq_length, tr.seed)
    )
    if tr.epochs is not None:
        log.info(
            "data: %d pairs; %g epochs = %d iterations",
            len(train_set),
            tr.epochs,
            iters_for_epochs(tr, len(train_set)),
        )
    source = {"dataset": train_set}
    before_step, on_start = None, None
    if settings.reference == "model":
        before_step = reference.per_step_reference()
    else:

        def on_start(run) -> None:
            key = reference.cache_key(data_fingerprint(cfg, len(train_set)), cfg.load)
            root = DataConfig(path=data.paths(), cache_dir=data.cache_dir).cache_root()
            path = root / "dpo_reference" / f"{key}.npy"
            table = reference.precompute(run, train_set, path)
            source["dataset"] = reference.WithReference(train_set, table)

    def batches(consumed: int, dp_rank: int, dp: int):
        ordered = Epochs(source["dataset"], tr.iters * tr.global_batch_size, tr.seed)
        return micro_batches(
            ordered, consumed, tr.micro_batch_size, tr.global_batch_size, dp_rank, dp
        )

    return Task(
        name="dpo",
        batches=batches,
        loss=make_dpo_loss(
            settings.loss, settings.beta, settings.label_smoothing, settings.sft_weight
        ),
        forward=pair_forward,
        rows_per_sample=2,
        on_start=on_start,
        before_step=before_step,
    )


@hydra_command("dpo", DPOConfig)
def main(cfg: DPOConfig) -> None:
    if cfg.dry_run:
        print(describe_plan(cfg))
        return
    train(cfg, make_dpo_task)


if __name__ == "__main__":
    main()
