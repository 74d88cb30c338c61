"""`python -m mtrain.prepare data.path=corpus.jsonl tokenizer=HF_DIR [data.workers=8]`

Tokenizes pretraining corpora ahead of training, into the same cache training reads from (or
the `data.cache_dir` given), so a big corpus is tokenized once, with many processes, and every
later run starts at once. Pass the printed prefixes (or the raw paths again) as `data.path`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from omegaconf import MISSING

from mtrain.cli import hydra_command
from mtrain.config.data import DataConfig
from mtrain.data.corpus import prepare_inputs

log = logging.getLogger("mtrain.prepare")


@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)  # the corpora, as training will see them
    tokenizer: str = MISSING  # HF tokenizer directory (AutoTokenizer.from_pretrained)


@hydra_command("prepare", PrepareConfig)
def main(cfg: PrepareConfig) -> None:
    done = prepare_inputs(cfg.data, cfg.tokenizer)
    tokenized = [p for p in done if not p.cached]
    log.info(
        "prepare: %d input(s) ready, %d tokenized, %s tokens in all; train with data.path=[%s]",
        len(done), len(tokenized), f"{sum(p.tokens for p in done):,}",
        ",".join(str(p.prefix) for p in done),
    )  # fmt: skip


if __name__ == "__main__":
    main()
