"""The `data` config group for DPO: preference pairs (a prompt, a chosen and a rejected
response), read and tokenized as SFT conversations are (mtrain/data/pairs.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mtrain.config.sft_data import COLUMN_NAMES, SFTDataConfig
from mtrain.errors import ConfigError


@dataclass
class DPODataConfig(SFTDataConfig):
    """SFT's keys; `format` names the pair layouts of the same names (pairs.py), `columns` may
    also rename chosen, rejected, prompt and conversations (and, for KTO's unpaired records,
    completion and label: mtrain/data/kto.py). Each pair is two padded sequences,
    so packing is off, and the loss is on the final response, so train_on stays `last`."""

    train_on: str = "last"  # fixed: DPO compares the final responses only

    ranking: ClassVar[bool] = True
    column_names: ClassVar[tuple[str, ...]] = (
        *COLUMN_NAMES, "chosen", "rejected", "prompt", "conversations", "completion", "label",
        "margin",
    )  # fmt: skip

    def validate(self) -> DPODataConfig:
        if self.packing:
            raise ConfigError(
                "data.packing is not supported for DPO: a pair's chosen and rejected responses "
                "are two sequences of seq_length each; set data.packing=false"
            )
        if self.train_on != "last":
            raise ConfigError(
                f"data.train_on={self.train_on} is not supported for DPO: its loss is always on "
                "the final response (chosen or rejected); remove data.train_on"
            )
        super().validate()
        return self
