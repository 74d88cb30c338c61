"""`python -m mtrain.dpo +model=qwen3_8b model.hf_dir=HF load=CKPT save=OUT data.path=pairs.jsonl`

Direct Preference Optimization on the shared loop: pairs of a prompt with a chosen and a
rejected response (alpaca, sharegpt or OpenAI layouts), rendered with the chat template; the
loss compares the policy's and a reference's log-probs of both responses (mtrain/losses.py).
The reference (`dpo.reference`) is precomputed once by default (mtrain/reference.py).

The same command trains the relatives of DPO, chosen by `dpo.loss`: SimPO and ORPO need no
reference (none is built or run), KTO reads unpaired labelled samples (mtrain/data/kto.py).
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
from mtrain.data.kto import build_kto_datasets
from mtrain.data.pairs import build_pair_datasets
from mtrain.data.sampler import micro_batches
from mtrain.dry_run import describe_plan
from mtrain.errors import ConfigError
from mtrain.losses import (
    DPO_LOSSES,
    REFERENCE_FREE,
    make_dpo_loss,
    make_kto_loss,
    pair_forward,
    sample_units,
)
from mtrain.trainer import Setup, Task, train

log = logging.getLogger("mtrain.dpo")
REFERENCES = ("precompute", "model")


@dataclass
class DPOSettings:
    # strength of the pull towards the reference (the KL weight); ORPO: the odds-ratio weight
    beta: float = 0.1
    # sigmoid | ipo | hinge | simpo | orpo (both reference-free) | kto (unpaired labelled data)
    loss: str = "sigmoid"
    label_smoothing: float = 0.0  # sigmoid, simpo: assumed fraction of flipped preference labels
    gamma: float = 0.5  # simpo: the target reward margin
    desirable_weight: float = 1.0  # kto: weight of the desirable samples' losses
    undesirable_weight: float = 1.0  # kto: weight of the undesirable samples' losses
    sft_weight: float = 0.0  # add this times the chosen response's mean token NLL
    # precompute: log-probs of the starting model, once, cached next to the data | model: a
    # frozen copy run every step (with finetuning_type=lora: the policy with adapters off)
    reference: str = "precompute"

    def validate(self) -> DPOSettings:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta={self.beta} must be positive")
        if self.loss not in (*DPO_LOSSES, "kto"):
            raise ConfigError(f"dpo.loss={self.loss} is not one of {', '.join(DPO_LOSSES)}, kto")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss not in ("sigmoid", "simpo"):
            raise ConfigError(
                f"dpo.label_smoothing applies to dpo.loss=sigmoid or simpo, not {self.loss}"
            )
        for key in ("desirable_weight", "undesirable_weight"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"dpo.{key}={getattr(self, key)} must be positive")
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


def data_fingerprint(cfg: DPOConfig, pairs: int, split: str = "train") -> dict:
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
        **({} if split == "train" else {"split": split}),  # train keys stay as they were
        **({"kto": True} if cfg.dpo.loss == "kto" else {}),
    }


def make_dpo_task(cfg: DPOConfig, setup: Setup) -> Task:
    from mtrain import reference

    settings, tr, data = cfg.dpo, cfg.train, cfg.data
    cfg.model.tokenizer_dir("DPO renders and tokenizes the pairs with the model's HF tokenizer")
    needs_reference = settings.loss not in REFERENCE_FREE
    if cfg.load is None and needs_reference:
        raise ConfigError("DPO needs load=CKPT_DIR: the starting model, also the reference")
    kto = settings.loss == "kto"
    if kto and tr.micro_batch_size < 2:
        raise ConfigError(
            "dpo.loss=kto estimates its KL term over each micro-batch's mismatched pairs; set "
            "train.micro_batch_size >= 2"
        )
    if kto and data.dataset is not None:
        raise ConfigError(
            "dpo.loss=kto reads prompt/completion/label files from data.path; "
            "data.dataset describes LLaMA-Factory pairs and conversations"
        )
    build = build_kto_datasets if kto else build_pair_datasets
    train_set, val_set = parallel.cluster_first(
        lambda: build(data, cfg.model.hf_dir, tr.seq_length, tr.seed)
    )
    if tr.epochs is not None:
        log.info(
            "data: %d %s; %g epochs = %d iterations",
            len(train_set),
            "samples" if kto else "pairs",
            tr.epochs,
            iters_for_epochs(tr, len(train_set)),
        )
    source = {"train": train_set, "validation": val_set}
    model_reference = reference.ModelReference() if settings.reference == "model" else None

    def on_start(run) -> None:
        """Reference log-probs of the training pairs (precompute) and the validation pairs (every
        reference mode: the reference never changes, so one pass before training serves every
        evaluation)."""
        root = DataConfig(path=data.paths(), cache_dir=data.cache_dir).cache_root()
        for split, dataset in (("train", train_set), ("validation", val_set)):
            if dataset is None or (split == "train" and model_reference is not None):
                continue
            key = reference.cache_key(data_fingerprint(cfg, len(dataset), split), cfg.load)
            path = root / "dpo_reference" / f"{key}.npy"
            if model_reference is None:
                table = reference.precompute(run, dataset, path)
            else:
                with model_reference.chunks(run) as chunks:
                    table = reference.precompute(run, dataset, path, chunks)
            source[split] = reference.WithReference(dataset, table)

    def batches(consumed: int, dp_rank: int, dp: int):
        ordered = Epochs(source["train"], tr.iters * tr.global_batch_size, tr.seed)
        return micro_batches(
            ordered, consumed, tr.micro_batch_size, tr.global_batch_size, dp_rank, dp
        )

    def eval_batches(dp_rank: int, dp: int):
        return micro_batches(
            source["validation"], 0, tr.micro_batch_size, tr.global_batch_size, dp_rank, dp
        )

    if kto:
        loss = make_kto_loss(settings.beta, settings.desirable_weight, settings.undesirable_weight)
    else:
        loss = make_dpo_loss(
            settings.loss, settings.beta, settings.label_smoothing, settings.sft_weight,
            settings.gamma,
        )  # fmt: skip
    if not needs_reference:
        log.info(
            "dpo.loss=%s is reference-free: no reference model, no reference pass", settings.loss
        )
    has_val = val_set is not None and len(val_set) > 0
    return Task(
        name=settings.loss if settings.loss in (*REFERENCE_FREE, "kto") else "dpo",
        batches=batches,
        loss=loss,
        forward=pair_forward,
        eval_batches=eval_batches if has_val else None,
        eval_samples=len(val_set) if has_val else 0,
        eval_forward=pair_forward,
        eval_loss=loss,
        rows_per_sample=2,
        units=sample_units,
        on_start=on_start if needs_reference else None,
        before_step=model_reference.before_step if needs_reference and model_reference else None,
    )


@hydra_command("dpo", DPOConfig)
def main(cfg: DPOConfig) -> None:
    if cfg.dry_run:
        print(describe_plan(cfg))
        return
    train(cfg, make_dpo_task)


if __name__ == "__main__":
    main()
