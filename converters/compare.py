"""`python -m converters.compare a=HF_DIR b=HF_DIR`: are two HF checkpoints tensor-for-tensor equal?

Streams one tensor at a time. Exit code 0 when every tensor has the same name, dtype and bits;
otherwise the differences are listed and the exit code is 2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import MISSING

from mtrain.checkpoint.hf_io import HFReader
from mtrain.cli import hydra_command
from mtrain.errors import MtrainError

log = logging.getLogger("converters.compare")


@dataclass
class CompareConfig:
    a: str = MISSING  # first HF model directory
    b: str = MISSING  # second HF model directory


def compare(a: str, b: str) -> list[str]:
    """Human-readable differences between two checkpoints; empty when bit-identical."""
    ra, rb = HFReader(a), HFReader(b)
    problems = [f"{n}: only in {a}" for n in sorted(set(ra.weight_map) - set(rb.weight_map))]
    problems += [f"{n}: only in {b}" for n in sorted(set(rb.weight_map) - set(ra.weight_map))]
    with ra.session(), rb.session():
        for name in sorted(set(ra.weight_map) & set(rb.weight_map)):
            x, y = ra(name), rb(name)
            if x.dtype != y.dtype or x.shape != y.shape:
                problems.append(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            elif not torch.equal(x, y):
                diff = (x.float() - y.float()).abs().max().item()
                problems.append(f"{name}: values differ (max |diff| {diff:.3g})")
    return problems


@hydra_command("compare", CompareConfig)
def main(cfg: CompareConfig) -> None:
    problems = compare(cfg.a, cfg.b)
    count = len(HFReader(cfg.a).weight_map)
    if problems:
        for p in problems[:20]:
            log.info("  %s", p)
        raise MtrainError(f"{cfg.a} and {cfg.b} differ in {len(problems)} of {count} tensors")
    log.info("compare: all %d tensors bit-identical (names, dtypes, values)", count)


if __name__ == "__main__":
    main()
