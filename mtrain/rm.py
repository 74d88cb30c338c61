"""`python -m mtrain.rm +model=qwen3_8b model.hf_dir=HF load=CKPT save=OUT data.path=pairs.jsonl`

Reward modelling on the shared loop: the preference pairs DPO reads (mtrain/data/pairs.py),
the LM head replaced by a scalar head (mtrain/models/score.py), the reward read at each
sequence's last non-pad token, a Bradley-Terry loss with an optional per-pair `margin` column
and a centring term (mtrain/reward.py). `load=` is a language model (Megatron checkpoint or HF
directory; the head starts fresh) or a reward model (an mtrain one, or an HF
*ForSequenceClassification directory) to train further. `checkpoint.save_hf` / mcore2hf write
an HF *ForSequenceClassification model with one label and the pad id set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mtrain import parallel
from mtrain.cli import hydra_command
from mtrain.config.dpo_data import DPODataConfig
from mtrain.config.schema import TrainingCommandConfig, iters_for_epochs
from mtrain.data.epochs import Epochs
from mtrain.data.pairs import WithMargins, build_pair_datasets, read_margins
from mtrain.data.sampler import micro_batches
from mtrain.dry_run import describe_plan
from mtrain.errors import ConfigError, DataError
from mtrain.losses import sample_units
from mtrain.models.score import reward_forward
from mtrain.reward import make_reward_loss
from mtrain.trainer import Setup, Task, train

log = logging.getLogger("mtrain.rm")


@dataclass
class RMSettings:
    # weight of the centring term c (r_chosen + r_rejected)^2 that keeps rewards near 0 (TRL's
    # center_rewards_coefficient); 0: off
    center_coef: float = 0.0

    def validate(self) -> RMSettings:
        if self.center_coef < 0:
            raise ConfigError(f"rm.center_coef={self.center_coef} must be >= 0")
        return self


@dataclass
class RMConfig(TrainingCommandConfig):
    """Reward modelling: the shared training config with preference pairs (`data.*`, as DPO's;
    a `margin` field per pair is used when every record has one) and `rm.*`.
    `train.micro_batch_size` and `train.global_batch_size` count pairs."""

    data: DPODataConfig = field(default_factory=DPODataConfig)
    rm: RMSettings = field(default_factory=RMSettings)


def with_margins(dataset, data: DPODataConfig):
    """`dataset` with each pair's margin when its files give them, else as it is."""
    margins = [read_margins(f, data) for f in dataset.files]
    if all(m is None for m in margins):
        return dataset
    if any(m is None for m in margins):
        raise DataError(
            "some data files give a margin per pair and others do not; give all or none"
        )
    return WithMargins(dataset, margins)


def make_rm_task(cfg: RMConfig, setup: Setup) -> Task:
    tr, data = cfg.train, cfg.data
    cfg.model.tokenizer_dir("the reward model renders and tokenizes pairs with the HF tokenizer")
    if cfg.parallel.cp > 1:
        raise ConfigError(
            f"parallel.cp={cfg.parallel.cp}: a reward is read at one token of each sequence, "
            "which context parallelism splits over ranks; train reward models with parallel.cp=1"
        )
    if cfg.checkpoint.format != "legacy":
        raise ConfigError(
            "checkpoint.format=torch_dist is not available for reward models yet; use legacy"
        )
    if (
        cfg.finetuning_type == "lora"
        and cfg.checkpoint.save_hf
        and cfg.checkpoint.save_hf_lora != "merged"
    ):
        raise ConfigError(
            "checkpoint.save_hf_lora=adapter: a reward model's head is not a PEFT adapter; "
            "export it merged (checkpoint.save_hf_lora=merged)"
        )
    train_set, val_set = parallel.cluster_first(
        lambda: build_pair_datasets(data, cfg.model.hf_dir, tr.seq_length, tr.seed)
    )
    train_set = with_margins(train_set, data)
    val_set = None if val_set is None else with_margins(val_set, data)
    if tr.epochs is not None:
        log.info(
            "data: %d pairs; %g epochs = %d iterations",
            len(train_set),
            tr.epochs,
            iters_for_epochs(tr, len(train_set)),
        )
    pad_id = int(getattr(train_set, "dataset", train_set).pad_id)

    def batches(consumed: int, dp_rank: int, dp: int):
        ordered = Epochs(train_set, tr.iters * tr.global_batch_size, tr.seed)
        return micro_batches(
            ordered, consumed, tr.micro_batch_size, tr.global_batch_size, dp_rank, dp
        )

    def eval_batches(dp_rank: int, dp: int):
        return micro_batches(val_set, 0, tr.micro_batch_size, tr.global_batch_size, dp_rank, dp)

    loss, forward = make_reward_loss(cfg.rm.center_coef), reward_forward(pad_id)
    has_val = val_set is not None and len(val_set) > 0
    return Task(
        name="rm",
        batches=batches,
        loss=loss,
        forward=forward,
        eval_batches=eval_batches if has_val else None,
        eval_samples=len(val_set) if has_val else 0,
        eval_forward=forward,
        eval_loss=loss,
        rows_per_sample=2,
        units=sample_units,
        head="score",
        checkpoint_args={"model_head": "score", "pad_token_id": pad_id},
    )


@hydra_command("rm", RMConfig)
def main(cfg: RMConfig) -> None:
    if cfg.dry_run:
        print(describe_plan(cfg))
        return
    train(cfg, make_rm_task)


if __name__ == "__main__":
    main()
