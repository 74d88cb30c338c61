"""Transformer Engine's layer spec (CUDA), presenting the local spec's checkpoint names.

TE fuses each pre-norm into the following linear, so two tensors have other names in the module
tree; the model's state-dict hooks rename them both ways, and drop / refill TE's `_extra_state`
(FP8 metadata, empty without FP8). Checkpoints written at kernels=te therefore load at
kernels=local, sdpa, torch_npu or mindspeed, and the other way round.
"""

from __future__ import annotations

from typing import Any

import torch

from mtrain.models.families.base import FUSED_NORM_NAMES

LAYER_RENAMES = list(FUSED_NORM_NAMES)  # (local-spec name, TE-spec name)
EXTRA_STATE = "._extra_state"


def _rename(state: dict[str, Any], prefix: str, pairs: list[tuple[str, str]]) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        for old, new in pairs:
            if key.endswith("." + old) and ".layers." in key:
                state[key[: -len(old)] + new] = state.pop(key)
                break


def to_local_names(state: dict[str, Any], prefix: str = "") -> None:
    """TE names -> local names, in place; TE's `_extra_state` entries are dropped."""
    for key in [k for k in state if k.startswith(prefix) and k.endswith(EXTRA_STATE)]:
        del state[key]
    _rename(state, prefix, [(te, local) for local, te in LAYER_RENAMES])


def to_te_names(state: dict[str, Any], prefix: str = "") -> None:
    _rename(state, prefix, LAYER_RENAMES)


def present_local_names(model: torch.nn.Module) -> None:
    """Make `model.state_dict()` / `load_state_dict()` speak local-spec names."""

    def on_save(module, state, prefix, local_metadata):
        to_local_names(state, prefix)

    def on_load(state, prefix, local_metadata, strict, missing, unexpected, errors):
        to_te_names(state, prefix)
        for name, sub in model.named_modules():
            if type(sub).get_extra_state is not torch.nn.Module.get_extra_state:
                state.setdefault(f"{prefix}{name}{EXTRA_STATE}", sub.get_extra_state())

    model._register_state_dict_hook(on_save)
    model._register_load_state_dict_pre_hook(on_load)


def prepare(chunk: torch.nn.Module, ops: Any, packed: bool) -> None:
    """A built chunk saves and loads the local spec's names, so checkpoints move between kernels."""
    present_local_names(chunk)


def layer_spec(qk_layernorm: bool, packed: bool, ops: Any, config: Any):
    """TE's layer spec (`ops`, `config`: not needed here)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.enums import AttnMaskType

    layer = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    if packed:  # block-causal masks of packed rows: TE's arbitrary-mask attention
        layer.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    return layer
