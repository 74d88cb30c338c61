"""The freeze.trainable pattern language, on a model built without process groups."""

from __future__ import annotations

import pytest
import torch

from mtrain.errors import ConfigError
from mtrain.freeze import _parse


class Layer(torch.nn.Module):
    def __init__(self, number: int):
        super().__init__()
        self.layer_number = number
        self.mlp = torch.nn.Linear(2, 2)
        self.self_attention = torch.nn.Linear(2, 2)


def selected(pattern: str, num_layers: int = 8) -> set[tuple]:
    rule = _parse(pattern, num_layers)
    names = [(layer, part) for layer in range(num_layers) for part in ("mlp.w", "self_attention.w")]
    names += [
        (None, "embedding.word_embeddings.weight"),
        (None, "output_layer.weight"),
        (None, "decoder.final_layernorm.weight"),
    ]
    return {n for n in names if rule(*n)}


def test_layer_slices_are_python_slices_over_global_layer_numbers():
    assert {layer for layer, _ in selected("layers.-2:")} == {6, 7}
    assert {layer for layer, _ in selected("layers.1:3")} == {1, 2}
    assert selected("layers.0") == {(0, "mlp.w"), (0, "self_attention.w")}
    assert selected("layers.-2:.mlp") == {(6, "mlp.w"), (7, "mlp.w")}


def test_parts_and_top_level_modules():
    assert {part for _, part in selected("mlp")} == {"mlp.w"} and len(selected("mlp")) == 8
    assert selected("output_layer") == {(None, "output_layer.weight")}
    assert selected("final_layernorm") == {(None, "decoder.final_layernorm.weight")}


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("layer.3", "is not a pattern"),
        ("layers.9", "outside the model's 8 layers"),
        ("layers.5:2", "selects no layer"),
        ("layers.-1:.ffn", "names part 'ffn'"),
    ],
)
def test_bad_patterns_are_refused_by_name(pattern, message):
    with pytest.raises(ConfigError, match=message):
        _parse(pattern, 8)
