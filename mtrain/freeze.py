"""`finetuning_type=freeze`: train only the parameters `freeze.trainable` names.

Patterns (any number, a parameter is trained when one matches):

    layers.-4:            the last four decoder layers (Python slice over global layer numbers)
    layers.0              one layer
    layers.-2:.mlp        a part of some layers (self_attention, mlp, input_layernorm, ...)
    mlp                   that part in every layer
    embedding, output_layer, final_layernorm

Layer numbers are global, whatever the pipeline stage holding the layer. With tied embeddings the
embedding and the output layer are one weight: naming either trains it.
"""

from __future__ import annotations

import logging
import re

import torch

from mtrain.errors import ConfigError

log = logging.getLogger("mtrain.freeze")

TOP_LEVEL = {
    "embedding": "embedding.",
    "output_layer": "output_layer.",
    "final_layernorm": "decoder.final_layernorm.",
}
LAYER_PARTS = ("self_attention", "mlp", "input_layernorm", "pre_mlp_layernorm")
_LAYER = re.compile(r"^layers\.(-?\d*)(:?)(-?\d*)(?:\.(\w+))?$")


def _parse(pattern: str, num_layers: int):
    """A predicate over (global layer number or None, path below the layer or module)."""
    if pattern in TOP_LEVEL:
        prefix = TOP_LEVEL[pattern]
        return lambda layer, name: layer is None and name.startswith(prefix)
    if pattern in LAYER_PARTS:
        return lambda layer, name: layer is not None and name.startswith(pattern + ".")
    match = _LAYER.match(pattern)
    if not match:
        raise ConfigError(
            f"freeze.trainable: {pattern!r} is not a pattern; use layers.<slice>[.<part>], a "
            f"part ({', '.join(LAYER_PARTS)}) or one of {', '.join(TOP_LEVEL)}"
        )
    start, colon, stop, part = match.groups()
    if part is not None and part not in LAYER_PARTS:
        raise ConfigError(
            f"freeze.trainable: {pattern!r} names part {part!r}; known parts: "
            f"{', '.join(LAYER_PARTS)}"
        )
    indices = range(num_layers)
    if colon:
        chosen = set(indices[slice(int(start) if start else None, int(stop) if stop else None)])
    else:
        if not start or not -num_layers <= int(start) < num_layers:
            raise ConfigError(
                f"freeze.trainable: {pattern!r} is outside the model's {num_layers} layers"
            )
        chosen = {indices[int(start)]}
    if not chosen:
        raise ConfigError(f"freeze.trainable: {pattern!r} selects no layer of {num_layers}")
    return lambda layer, name: layer in chosen and (part is None or name.startswith(part + "."))


def apply_freeze(
    chunks: list[torch.nn.Module], patterns: list[str], num_layers: int, tied: bool
) -> tuple[int, int]:
    """Set requires_grad on this rank's parameters; returns (trainable, total) element counts.

    Must run before DDP and the optimizer are built: both only take trainable parameters.
    """
    rules = [_parse(p, num_layers) for p in patterns]
    if tied and ({"embedding", "output_layer"} & set(patterns)):
        rules.append(
            lambda layer, name: layer is None and name.startswith(("embedding.", "output_layer."))
        )
    trainable = total = 0
    for chunk in chunks:
        layer_numbers = [layer.layer_number - 1 for layer in chunk.decoder.layers]
        for name, param in chunk.named_parameters():
            layer, rest = None, name
            if name.startswith("decoder.layers."):
                local, rest = name[len("decoder.layers.") :].split(".", 1)
                layer = layer_numbers[int(local)]
            param.requires_grad_(any(rule(layer, rest) for rule in rules))
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
    return trainable, total
