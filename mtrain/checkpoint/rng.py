"""A rank's RNG streams (Python, numpy, torch and megatron's tracker) as plain values, so that a
training checkpoint restores each stream exactly."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from mtrain import parallel


def rng_state() -> dict[str, Any]:
    """This rank's RNG streams as plain Python values (bytes, not tensors), so they can be
    gathered across ranks as objects and saved without pickled tensors."""
    name, keys, *rest = np.random.get_state()
    tracker = parallel.rng_tracker_states()
    return {
        "random": random.getstate(),
        "np": [name, keys.tobytes(), *rest],
        "torch": torch.get_rng_state().numpy().tobytes(),
        "tracker": {k: v.cpu().numpy().tobytes() for k, v in tracker.items()},
    }


def bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    name, keys, *rest = state["np"]
    np.random.set_state((name, np.frombuffer(keys, dtype=np.uint32).copy(), *rest))
    torch.set_rng_state(bytes_tensor(state["torch"]))
    parallel.set_rng_tracker_states({k: bytes_tensor(v) for k, v in state["tracker"].items()})
