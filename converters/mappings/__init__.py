"""One mapping table per architecture family; adding a family is adding a table here."""

from __future__ import annotations

from converters.mappings.base import Entry, Family, Kind
from converters.mappings.llama import LLAMA
from converters.mappings.qwen2 import QWEN2
from converters.mappings.qwen3 import QWEN3

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN3, QWEN2, LLAMA)}

__all__ = ["Entry", "FAMILIES", "Family", "Kind", "family_for_model_type"]


def family_for_model_type(model_type: str) -> Family | None:
    """The family that reads HF `model_type`, or None when mtrain does not support it."""
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    return None
