"""A reward model's scalar head in place of the LM head, and where the reward is read.

The head is one [1, hidden] weight (HF `score.weight` of *ForSequenceClassification), held whole
on every tensor-parallel rank: after megatron's final norm every rank has the whole hidden
state of every token (with sequence parallelism it is gathered first), so every rank computes
the same rewards and, from the same loss, the same gradients. Nothing is reduced over TP, and
the result does not depend on TP or PP. With sequence parallelism the gather's backward keeps
each rank's own slice of the (identical) gradient, which is exact for the same reason.

The head replaces `output_layer` in megatron's GPTModel (which calls it on the last stage) and
is registered as `score`, so state dicts name it `score.weight`. A reward is the head's output
at a sequence's last non-pad token, found as transformers finds it: the rightmost position
whose token is not the pad id.
"""

from __future__ import annotations

import torch

from mtrain.models.families.base import SCORE

SCORE_KEY = SCORE.mcore


class ScoreHead(torch.nn.Module):
    """(hidden [s, b, h]) -> (scores [s, b, 1], None), as megatron's output layer is called."""

    def __init__(self, hidden: int, dtype: torch.dtype, std: float, sequence_parallel: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)  # the same start on every rank, whatever TP is
        weight = torch.randn(1, hidden, generator=g, dtype=torch.float32) * std
        self.weight = torch.nn.Parameter(weight.to(dtype))
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core import tensor_parallel

            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False
            )
        return torch.nn.functional.linear(hidden, self.weight), None


def attach_score_head(model: torch.nn.Module, std: float) -> None:
    """Replace the last stage's LM head of a megatron GPTModel by a `ScoreHead`."""
    config = model.config
    head = ScoreHead(config.hidden_size, config.params_dtype, std, config.sequence_parallel)
    del model.output_layer
    model.score = head.to(next(model.parameters()).device)
    # GPTModel calls self.output_layer: point it at the head without registering it twice.
    object.__setattr__(model, "output_layer", model.score)


def train_score_head(chunks: list[torch.nn.Module]) -> int:
    """Make the score head trainable after freeze or LoRA froze the model (a fresh head must
    learn; PEFT's `modules_to_save` for the same reason); returns its element count here."""
    count = 0
    for chunk in chunks:
        head = getattr(chunk, "score", None)
        if head is not None and not head.weight.requires_grad:
            head.weight.requires_grad_(True)
            count += head.weight.numel()
    return count


def last_token_rewards(scores: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The reward [n] of each sequence from the head's output [n, s, 1] and its tokens [n, s]."""
    positions = torch.arange(tokens.shape[-1], device=tokens.device)
    last = (positions * (tokens != pad_id)).argmax(-1)
    return scores.squeeze(-1).gather(1, last[:, None]).squeeze(1)


def reward_forward(pad_id: int):
    """The loop's forward for reward-model batches of m pairs ([m, 2, S] tensors): rewards [2m]
    on the last pipeline stage, hidden states elsewhere."""
    from megatron.core import parallel_state

    def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = {k: v.flatten(0, 1) for k, v in batch.items() if v.dim() == 3}
        out = model(flat["tokens"], flat["position_ids"], attention_mask=None)
        if not parallel_state.is_pipeline_last_stage():
            return out
        return last_token_rewards(out, flat["tokens"], pad_id)

    return forward
