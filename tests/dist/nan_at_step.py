"""Worker: `python -m mtrain.pt` whose loss is NaN at iteration NAN_AT (env) only."""

import os
import sys

import torch

from mtrain import pt

NAN_AT = int(os.environ["NAN_AT"])
calls = {"n": 0}
real_loss = pt.lm_loss


def poisoned_loss(batch, token_losses):
    calls["n"] += 1  # one call per micro-batch on the last stage
    total, count, metrics = real_loss(batch, token_losses)
    micro = int(os.environ["MICRO_BATCHES"])
    if (NAN_AT - 1) * micro < calls["n"] <= NAN_AT * micro:
        total = total * torch.tensor(float("nan"))
        metrics = {"loss": torch.stack([total.detach(), count.detach().float()])}
    return total, count, metrics


pt.lm_loss = poisoned_loss
sys.argv = ["mtrain.pt", *sys.argv[1:]]
pt.main()
