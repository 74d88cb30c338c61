"""`python -m mtrain.sft +model=qwen3_32b model.hf_dir=HF load=CKPT save=OUT data.path=chat.jsonl`

Supervised fine-tuning on conversations (alpaca, sharegpt or OpenAI messages), rendered with the
model's chat template; by default only assistant tokens are trained. With `data.packing=true`
samples share sequences and a block-causal attention mask keeps each to itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from mtrain import kernels, parallel
from mtrain.cli import hydra_command
from mtrain.config.schema import TrainingCommandConfig, iters_for_epochs
from mtrain.config.sft_data import SFTDataConfig
from mtrain.data.epochs import Epochs
from mtrain.data.packing import block_causal_mask
from mtrain.data.sampler import micro_batches
from mtrain.data.sft import build_sft_datasets
from mtrain.dry_run import describe_plan
from mtrain.losses import lm_loss
from mtrain.trainer import Setup, Task, train

log = logging.getLogger("mtrain.sft")


@dataclass
class SFTConfig(TrainingCommandConfig):
    """SFT: the shared training config with conversation data (`data.*`)."""

    data: SFTDataConfig = field(default_factory=SFTDataConfig)


class Rows(torch.utils.data.Dataset):
    """SFT samples as the model takes them: a packed row's `cu_seqlens` becomes its attention
    mask (True = masked out), or stays the boundaries themselves for kernels that run packed
    rows as variable-length sequences (`cu_seqlens_masks`); unpacked rows need none (causal,
    padding only at the end)."""

    def __init__(self, dataset, packing: bool, seq_length: int, cu_seqlens_masks: bool = False):
        self.dataset, self.packing, self.seq_length = dataset, packing, seq_length
        self.cu_seqlens_masks = cu_seqlens_masks

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        sample = dict(self.dataset[i])
        cu_seqlens = sample.pop("cu_seqlens", None)
        if self.packing and self.cu_seqlens_masks:
            sample["attention_mask"] = cu_seqlens
        elif self.packing:
            sample["attention_mask"] = block_causal_mask(cu_seqlens, self.seq_length)
        return sample


def make_sft_task(cfg: SFTConfig, setup: Setup) -> Task:
    cfg.model.tokenizer_dir("SFT renders and tokenizes conversations with the model's HF tokenizer")
    tr, data = cfg.train, cfg.data
    train_set, val_set = parallel.cluster_first(
        lambda: build_sft_datasets(data, cfg.model.hf_dir, tr.seq_length, tr.seed)
    )
    if tr.epochs is not None:
        log.info(
            "data: %d training rows; %g epochs = %d iterations",
            len(train_set),
            tr.epochs,
            iters_for_epochs(tr, len(train_set)),
        )
    if data.packing:
        stats = train_set.stats
        per_row = stats["samples"] / max(stats["sequences"], 1)
        log.info(
            "packing: train.global_batch_size=%d counts packed rows of %d tokens; a step holds "
            "about %.0f samples (%.2f per row)",
            tr.global_batch_size,
            tr.seq_length,
            tr.global_batch_size * per_row,
            per_row,
        )
    cu_masks = kernels.cu_seqlens_masks(setup.kernels, cfg.npu)
    rows = Rows(
        Epochs(train_set, tr.iters * tr.global_batch_size, tr.seed),
        data.packing,
        tr.seq_length,
        cu_masks,
    )

    def batches(consumed: int, dp_rank: int, dp: int):
        return micro_batches(rows, consumed, tr.micro_batch_size, tr.global_batch_size, dp_rank, dp)

    eval_batches, eval_samples = None, 0
    if val_set is not None and len(val_set):
        val_rows = Rows(val_set, data.packing, tr.seq_length, cu_masks)
        eval_samples = len(val_rows)

        def eval_batches(dp_rank: int, dp: int):
            return micro_batches(
                val_rows, 0, tr.micro_batch_size, tr.global_batch_size, dp_rank, dp
            )

    return Task(
        name="sft",
        batches=batches,
        loss=lm_loss,
        eval_batches=eval_batches,
        eval_samples=eval_samples,
        attention_mask=data.packing,
    )


@hydra_command("sft", SFTConfig)
def main(cfg: SFTConfig) -> None:
    if cfg.dry_run:
        print(describe_plan(cfg))
        return
    train(cfg, make_sft_task)


if __name__ == "__main__":
    main()
