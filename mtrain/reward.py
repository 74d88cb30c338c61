"""The reward model's loss: Bradley-Terry on the scalar rewards of each pair's two sequences.

A reward-model micro-batch holds m pairs as [m, 2, S] tensors, as DPO's (row 0 chosen, row 1
rejected); the model's scalar head gives one reward per sequence, read at its last non-pad
token (mtrain/models/score.py). With r_c, r_r a pair's rewards, the optional margin column m
and the centring coefficient c (TRL's center_rewards_coefficient):

    loss = -log sigmoid(r_c - r_r - m) + c (r_c + r_r)^2

averaged over the pairs of the global batch.
"""

from __future__ import annotations

import torch

Batch = dict[str, torch.Tensor]


def reward_loss(
    rewards: torch.Tensor, margin: torch.Tensor | None = None, center_coef: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses [m] and metric values from rewards [m, 2] (chosen, rejected)."""
    import torch.nn.functional as F

    chosen, rejected = rewards[:, 0], rewards[:, 1]
    diff = chosen - rejected
    losses = -F.logsigmoid(diff if margin is None else diff - margin)
    if center_coef:
        losses = losses + center_coef * (chosen + rejected) ** 2
    metrics = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margin": diff,
        "rewards/accuracy": (diff > 0).float(),
    }
    return losses, metrics


def make_reward_loss(center_coef: float):
    """The trainer's loss function on the scalar head's rewards [2m] (margins in the batch's
    optional `margin` [m])."""

    def loss(batch: Batch, rewards: torch.Tensor):
        rewards = rewards.float().view(-1, 2)
        margin = batch.get("margin")
        losses, values = reward_loss(
            rewards, None if margin is None else margin.float(), center_coef
        )
        pairs = torch.tensor(float(len(losses)), device=losses.device)
        total = losses.sum()
        metrics = {"loss": torch.stack([total.detach(), pairs])}
        metrics.update({k: torch.stack([v.detach().sum(), pairs]) for k, v in values.items()})
        return total, pairs.int(), metrics

    return loss
