"""Language-model losses and metrics on tensor-parallel logits.

Every loss returns (sum over loss tokens, number of loss tokens, {metric: tensor([sum, count])}):
the trainer averages over all loss tokens of the global batch (see trainer.py). Logits stay split
over the vocabulary across TP ranks; nothing here gathers a full-vocabulary tensor.
"""

from __future__ import annotations

import torch

from mtrain import parallel

Batch = dict[str, torch.Tensor]


def lm_forward(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Per-token losses from megatron's own fused vocab-parallel cross-entropy."""
    return model(
        batch["tokens"],
        batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
    )


def token_units(batch: Batch) -> torch.Tensor:
    """The loss units of a language-model micro-batch: its loss tokens (what `lm_loss` counts)."""
    return batch["loss_mask"].sum()


def sample_units(batch: Batch) -> torch.Tensor:
    """The loss units of a micro-batch of pairs or samples ([m, 2, S] tensors): m."""
    return torch.tensor(float(batch["tokens"].shape[0]), device=batch["tokens"].device)


def lm_loss(batch: Batch, token_losses: torch.Tensor):
    mask = batch["loss_mask"].float()
    total = (token_losses.float() * mask).sum()
    count = mask.sum()
    return total, count.int(), {"loss": torch.stack([total.detach(), count.detach()])}


def logits_forward(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Vocab-parallel logits [batch, seq, vocab / TP] on the last stage."""
    return model(batch["tokens"], batch["position_ids"], attention_mask=batch.get("attention_mask"))


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from their TP shards (for checks; training never needs it)."""
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Global argmax over a vocabulary split across TP ranks (first maximum wins, as torch's)."""
    local_max, local_idx = logits.max(dim=-1)
    tp = parallel.tp_size()
    if tp == 1:
        return local_idx
    local_idx = local_idx + parallel.tp_rank() * logits.shape[-1]
    group = parallel.tp_group()
    maxes = [torch.empty_like(local_max) for _ in range(tp)]
    indices = [torch.empty_like(local_idx) for _ in range(tp)]
    torch.distributed.all_gather(maxes, local_max.contiguous(), group=group)
    torch.distributed.all_gather(indices, local_idx.contiguous(), group=group)
    best_rank = torch.stack(maxes).argmax(dim=0, keepdim=True)
    return torch.stack(indices).gather(0, best_rank).squeeze(0)


def lm_loss_and_accuracy(batch: Batch, logits: torch.Tensor):
    """Loss (as `lm_loss`) and next-token accuracy over the loss tokens, from logits."""
    from megatron.core import tensor_parallel

    labels = batch["labels"]
    token_losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)
    mask = batch["loss_mask"].float()
    total = (token_losses * mask).sum()
    count = mask.sum()
    correct = ((vocab_parallel_argmax(logits) == labels).float() * mask).sum()
    metrics = {
        "loss": torch.stack([total.detach(), count]),
        "accuracy": torch.stack([correct, count]),
    }
    return total, count.int(), metrics


# --- DPO and its reference-free relatives ---------------------------------------------------
#
# A DPO micro-batch holds m pairs as [m, 2, S] tensors (row 0 chosen, row 1 rejected); the
# model sees them as 2m sequences. A sequence's log-probability is the sum of its response
# tokens' log-probs, taken from megatron's vocab-parallel cross-entropy (no rank ever holds
# full-vocabulary logits). With pi = policy and ref = reference log-probs, c = chosen and
# r = rejected, and h = (pi_c - ref_c) - (pi_r - ref_r):
#     sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label smoothing)
#     ipo      (h - 1 / (2 beta))^2
#     hinge    max(0, 1 - beta h)
# plus `sft_weight` times the chosen response's mean token NLL. Rewards are beta (pi - ref).
# Reference-free, on the length-normalised log-probs a = pi / (response tokens):
#     simpo    sigmoid's formula on beta (a_c - a_r) - gamma (SimPO; rewards beta a)
#     orpo     -a_c - beta log sigmoid(log odds_c - log odds_r), log odds = a - log(1 - e^a)
#              (ORPO: the chosen response's mean NLL plus the odds-ratio term; rewards beta a)

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


def pair_forward(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Per-token losses [2m, S] of a micro-batch of m pairs."""
    flat = {k: v.flatten(0, 1) for k, v in batch.items() if v.dim() == 3}
    return lm_forward(model, flat)


class _SumOverContext(torch.autograd.Function):
    """Sum over the CP group, gradient passed through: each CP rank holds part of every
    sequence, and the whole log-prob's gradient reaches each part through its own rank."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        torch.distributed.all_reduce(x, group=parallel.cp_group())
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def sequence_logps(batch: Batch, token_losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob [m, 2], response tokens [m, 2]) of each pair's chosen and rejected sequence,
    whole under context parallelism (summed over the CP ranks' chunks)."""
    mask = batch["loss_mask"].flatten(0, 1).float()
    sums = torch.stack([-(token_losses.float() * mask).sum(-1), mask.sum(-1)])
    if parallel.cp_size() > 1:
        sums = _SumOverContext.apply(sums)
    logps, tokens = sums
    return logps.view(-1, 2), tokens.view(-1, 2)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate near 0 and far below it."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def dpo_loss(
    policy: torch.Tensor,
    reference: torch.Tensor | None,
    tokens: torch.Tensor,
    kind: str,
    beta: float,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    gamma: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses [m] and per-pair metric values from [m, 2] log-probs (chosen, rejected);
    `reference` is None for the reference-free kinds."""
    import torch.nn.functional as F

    if kind in REFERENCE_FREE:
        mean = policy / tokens.clamp(min=1)
        chosen_reward, rejected_reward = beta * mean[:, 0], beta * mean[:, 1]
        if kind == "simpo":
            z = chosen_reward - rejected_reward - gamma
            losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        else:
            odds = (mean[:, 0] - mean[:, 1]) - (_log1mexp(mean[:, 0]) - _log1mexp(mean[:, 1]))
            losses = -mean[:, 0] - beta * F.logsigmoid(odds)
    else:
        chosen_reward = beta * (policy[:, 0] - reference[:, 0])
        rejected_reward = beta * (policy[:, 1] - reference[:, 1])
        h = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
        if kind == "sigmoid":
            losses = -(1 - label_smoothing) * F.logsigmoid(
                beta * h
            ) - label_smoothing * F.logsigmoid(-beta * h)
        elif kind == "ipo":
            losses = (h - 1 / (2 * beta)) ** 2
        elif kind == "hinge":
            losses = torch.relu(1 - beta * h)
        else:
            raise ValueError(f"unknown DPO loss {kind!r}; known: {DPO_LOSSES}")
    if sft_weight:
        losses = losses + sft_weight * (-policy[:, 0] / tokens[:, 0].clamp(min=1))
    metrics = {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margin": chosen_reward - rejected_reward,
        "rewards/accuracy": (chosen_reward > rejected_reward).float(),
        "logps/chosen": policy[:, 0],
        "logps/rejected": policy[:, 1],
    }
    return losses, metrics


def _per_pair(total: torch.Tensor, pairs: torch.Tensor, values: dict[str, torch.Tensor]):
    metrics = {"loss": torch.stack([total.detach(), pairs])}
    metrics.update({k: torch.stack([v.detach().sum(), pairs]) for k, v in values.items()})
    return total, *_counted_once(pairs, metrics)


def _counted_once(count: torch.Tensor, metrics: dict[str, torch.Tensor]):
    """(count, metrics) as CP rank 0 reports them and zeros on the other CP ranks, which hold
    the same whole-sequence values (the trainer sums counts and metrics over DP x CP)."""
    if parallel.cp_size() > 1 and parallel.cp_rank() != 0:
        count = torch.zeros_like(count)
        metrics = {k: torch.zeros_like(v) for k, v in metrics.items()}
    return count.int(), metrics


def make_dpo_loss(
    kind: str, beta: float, label_smoothing: float, sft_weight: float, gamma: float = 0.0
):
    """The trainer's loss function: (sum of pair losses, number of pairs, metrics); the batch
    carries the reference log-probs as `ref_logps` [m, 2] unless `kind` is reference-free.
    Under context parallelism every CP rank has the whole pairs' losses (and backpropagates
    them into its own tokens); CP rank 0 alone counts the pairs and reports the metrics, as the
    counts are summed over CP."""

    def loss(batch: Batch, token_losses: torch.Tensor):
        policy, tokens = sequence_logps(batch, token_losses)
        reference = None if kind in REFERENCE_FREE else batch["ref_logps"].float()
        losses, values = dpo_loss(
            policy, reference, tokens, kind, beta, label_smoothing, sft_weight, gamma
        )
        pairs = torch.tensor(float(len(losses)), device=losses.device)
        return _per_pair(losses.sum(), pairs, values)

    return loss


# --- KTO ----------------------------------------------------------------------------------
#
# A KTO micro-batch holds m samples as [m, 2, S] tensors: row 0 the prompt with its own
# completion, row 1 the prompt with another sample's completion (data/kto.py), whose log-ratio
# estimates the KL term: z = clamp(mean over the micro-batch of (pi_1 - ref_1), min=0), no
# gradient. With the log-ratio l = pi_0 - ref_0 of the sample's completion, the loss is
#     desirable    w_d (1 - sigmoid(beta (l - z)))
#     undesirable  w_u (1 - sigmoid(beta (z - l)))
# averaged over samples; rewards are beta l, reported separately for the two labels.


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-sample losses [m], rewards [m], the KL estimate) from [m, 2] log-probs
    (completion, mismatched completion) and the desirable labels [m] (bool)."""
    kl = (policy[:, 1] - reference[:, 1]).mean().detach().clamp(min=0)
    ratio = policy[:, 0] - reference[:, 0]
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return losses, beta * ratio.detach(), kl


def make_kto_loss(beta: float, desirable_weight: float, undesirable_weight: float):
    """The trainer's loss function for KTO batches (`label` [m], `ref_logps` [m, 2])."""

    def loss(batch: Batch, token_losses: torch.Tensor):
        policy, _ = sequence_logps(batch, token_losses)
        good = batch["label"].bool()
        losses, rewards, kl = kto_loss(
            policy, batch["ref_logps"].float(), good, beta, desirable_weight, undesirable_weight
        )
        n = torch.tensor(float(len(losses)), device=losses.device)
        total, pos, neg = losses.sum(), good.float(), (~good).float()
        logps = policy[:, 0].detach()
        metrics = {
            "loss": torch.stack([total.detach(), n]),
            "rewards/chosen": torch.stack([(rewards * pos).sum(), pos.sum()]),
            "rewards/rejected": torch.stack([(rewards * neg).sum(), neg.sum()]),
            "logps/chosen": torch.stack([(logps * pos).sum(), pos.sum()]),
            "logps/rejected": torch.stack([(logps * neg).sum(), neg.sum()]),
            "kl": torch.stack([kl, torch.ones_like(kl)]),
        }
        return total, *_counted_once(n, metrics)

    return loss
