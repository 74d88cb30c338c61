"""TEST-ONLY stub of Ascend's `torchair` (graph mode), so that MindSpeed's op builders import.

MindSpeed registers graph-mode converters for its custom ops when its op builders are imported;
no graph is ever built on CPU, so the names only need to exist. Never install this for real use.
"""

from torchair import ge


def register_fx_node_ge_converter(op):
    """Returns the converter unchanged: there is no graph engine to register it with."""
    return lambda converter: converter


__all__ = ["ge", "register_fx_node_ge_converter"]
