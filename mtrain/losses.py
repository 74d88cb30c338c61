"""Language-model losses and metrics on tensor-parallel logits.

Every loss returns (sum over loss tokens, number of loss tokens, {metric: tensor([sum, count])}):
the trainer averages over all loss tokens of the global batch (see trainer.py). Logits stay split
over the vocabulary across TP ranks; nothing here gathers a full-vocabulary tensor.
"""

from __future__ import annotations

import torch

Batch = dict[str, torch.Tensor]


def lm_forward(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Per-token losses from megatron's own fused vocab-parallel cross-entropy."""
    return model(
        batch["tokens"],
        batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
    )


def lm_loss(batch: Batch, token_losses: torch.Tensor):
    mask = batch["loss_mask"].float()
    total = (token_losses.float() * mask).sum()
    count = mask.sum()
    return total, count.int(), {"loss": torch.stack([total.detach(), count.detach()])}


def logits_forward(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Vocab-parallel logits [batch, seq, vocab / TP] on the last stage."""
    return model(batch["tokens"], batch["position_ids"], attention_mask=batch.get("attention_mask"))


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Global argmax over a vocabulary split across TP ranks (first maximum wins, as torch's)."""
    from megatron.core import parallel_state as ps

    local_max, local_idx = logits.max(dim=-1)
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return local_idx
    local_idx = local_idx + ps.get_tensor_model_parallel_rank() * logits.shape[-1]
    group = ps.get_tensor_model_parallel_group()
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
