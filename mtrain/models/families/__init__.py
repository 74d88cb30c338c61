"""One mapping table per architecture family; adding a family is adding a table here."""

from __future__ import annotations

from mtrain.models.families.base import LORA_TARGETS, Entry, Family, Kind
from mtrain.models.families.llama import LLAMA
from mtrain.models.families.qwen2 import QWEN2
from mtrain.models.families.qwen3 import QWEN3
from mtrain.models.families.qwen3_moe import QWEN3_MOE

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN3, QWEN2, LLAMA, QWEN3_MOE)}

__all__ = [
    "Entry",
    "FAMILIES",
    "Family",
    "Kind",
    "LORA_TARGETS",
    "family_for_model_type",
    "hf_lora_names",
]


def family_for_model_type(model_type: str) -> Family | None:
    """The family that reads HF `model_type`, or None when mtrain does not support it."""
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    return None


def hf_lora_names() -> dict[str, str]:
    """HF module name (q_proj, ...) -> the LoRA target that fuses it, over every family."""
    return {k: v for f in FAMILIES.values() for k, v in f.hf_lora_names().items()}
