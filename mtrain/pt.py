"""`python -m mtrain.pt +model=qwen3_32b model.hf_dir=HF load=CKPT save=OUT data.path=corpus.jsonl`

Pretraining (or continued pretraining) on raw text: documents are tokenized once into a
Megatron indexed dataset (cached), concatenated, and cut into `train.seq_length` windows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mtrain import parallel
from mtrain.cli import hydra_command
from mtrain.config.schema import TrainingCommandConfig, iters_for_epochs
from mtrain.data.indexed import IndexedTokens
from mtrain.data.pt import build_pt_dataset, prepare_corpus
from mtrain.data.sampler import micro_batches
from mtrain.dry_run import describe_plan
from mtrain.losses import lm_loss
from mtrain.trainer import Setup, Task, train

log = logging.getLogger("mtrain.pt")


@dataclass
class PTConfig(TrainingCommandConfig):
    """Pretraining: the shared training config; the data is raw text (`data.*`)."""


def make_pt_task(cfg: PTConfig, setup: Setup) -> Task:
    cfg.model.tokenizer_dir("pretraining tokenizes with the model's HF tokenizer")
    tr = cfg.train
    if tr.epochs is not None:
        prefixes = parallel.cluster_first(lambda: prepare_corpus(cfg.data, cfg.model.hf_dir))
        samples = sum((IndexedTokens(p).num_tokens - 1) // tr.seq_length for p in prefixes)
        log.info(
            "data: %d samples of %d tokens per epoch; %g epochs = %d iterations",
            samples,
            tr.seq_length,
            tr.epochs,
            iters_for_epochs(tr, samples),
        )
    num_samples = tr.iters * tr.global_batch_size
    dataset = parallel.cluster_first(
        lambda: build_pt_dataset(cfg.data, cfg.model.hf_dir, tr.seq_length, num_samples, tr.seed)
    )

    def batches(consumed: int, dp_rank: int, dp: int):
        return micro_batches(
            dataset, consumed, tr.micro_batch_size, tr.global_batch_size, dp_rank, dp
        )

    return Task(name="pretraining", batches=batches, loss=lm_loss)


@hydra_command("pt", PTConfig)
def main(cfg: PTConfig) -> None:
    if cfg.dry_run:
        print(describe_plan(cfg))
        return
    train(cfg, make_pt_task)


if __name__ == "__main__":
    main()
