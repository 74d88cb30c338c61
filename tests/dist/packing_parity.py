"""Worker: two samples packed in one row with a block-causal mask give the same loss and
gradients as the two samples run alone (TP over the processes, fp32).

    torchrun --nproc_per_node 2 tests/dist/packing_parity.py CKPT RESULT.json
"""

import json
import sys
from pathlib import Path

import torch

from mtrain import accel, parallel
from mtrain.checkpoint import MegatronCheckpoint, load_model_weights

ckpt_dir, result = sys.argv[1], sys.argv[2]
accel.activate("cpu")
ckpt = MegatronCheckpoint.open(Path(ckpt_dir))
parallel.init(ckpt.tp, 1)
from mtrain.models.provider import BuildOptions, build_model_chunks  # noqa: E402

(model,) = build_model_chunks(ckpt.spec, BuildOptions(tp=ckpt.tp, explicit_attention_mask=True))
load_model_weights([model], ckpt_dir, ckpt.spec, ckpt.tp, 1)
generator = torch.Generator().manual_seed(0)
lengths = [10, 14]
samples = [torch.randint(0, 512, (n + 1,), generator=generator) for n in lengths]


def causal(n):  # True = masked out, megatron's convention
    return torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)[None, None]


def loss_and_grads(tokens, labels, mask, loss_mask):
    model.zero_grad()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    per_token = model(tokens, positions, attention_mask=mask, labels=labels)
    loss = (per_token * loss_mask).sum()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


# Alone: each sample is its own row.
alone_loss, alone_grads = 0.0, None
for s in samples:
    loss, grads = loss_and_grads(s[None, :-1], s[None, 1:], causal(len(s) - 1),
                                 torch.ones(1, len(s) - 1))
    alone_loss += loss
    alone_grads = grads if alone_grads is None else {n: alone_grads[n] + g for n, g in grads.items()}

# Packed: both in one row; attention confined to each sample, causal within it.
tokens = torch.cat([s[:-1] for s in samples])[None]
labels = torch.cat([s[1:] for s in samples])[None]
segment = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)])
blocked = (segment[:, None] != segment[None, :]) | causal(sum(lengths))[0, 0]
packed_loss, packed_grads = loss_and_grads(tokens, labels, blocked[None, None],
                                           torch.ones(1, sum(lengths)))

diff = max((packed_grads[n] - alone_grads[n]).abs().max().item() for n in alone_grads)
if torch.distributed.get_rank() == 0:
    json.dump({"loss_diff": abs(packed_loss - alone_loss), "grad_diff": diff,
               "loss": alone_loss}, open(result, "w"))
