"""Worker: validation loss and token accuracy from the trainer vs the HF model computed directly.

    torchrun --nproc_per_node N tests/dist/eval_parity.py HF_DIR CKPT TP PP RESULT.json
"""

import json
import sys

import torch

from mtrain import parallel
from mtrain.config.model import load_preset
from mtrain.config.schema import TrainingCommandConfig
from mtrain.losses import lm_loss
from mtrain.trainer import Task, train

hf_dir, ckpt, tp, pp, result = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
SEQ, SAMPLES = 32, 8
generator = torch.Generator().manual_seed(3)
data = torch.randint(0, 512, (SAMPLES, SEQ + 1), generator=generator)
mask = (torch.rand(SAMPLES, SEQ, generator=generator) > 0.3).float()  # some tokens do not count

# The reference, before any backend set-up: HF logits, masked mean loss and accuracy.
from transformers import AutoModelForCausalLM  # noqa: E402

with torch.no_grad():
    logits = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(data[:, :-1]).logits
losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), data[:, 1:], reduction="none")
reference = {"eval/loss": ((losses * mask).sum() / mask.sum()).item(),
             "eval/accuracy": (((logits.argmax(-1) == data[:, 1:]).float() * mask).sum()
                               / mask.sum()).item()}


def samples(dp_rank, dp, mbs=2):
    order = [i for step in range(0, SAMPLES, mbs * dp) for i in
             range(step + dp_rank * mbs, step + dp_rank * mbs + mbs)]
    for i in range(0, len(order), mbs):
        idx = order[i:i + mbs]
        yield {"tokens": data[idx, :-1], "labels": data[idx, 1:], "loss_mask": mask[idx],
               "position_ids": torch.arange(SEQ).expand(len(idx), SEQ)}


def forever(consumed, dp_rank, dp):
    while True:
        yield from samples(dp_rank, dp)


cfg = TrainingCommandConfig(model=load_preset("qwen3_tiny"), device="cpu", load=ckpt)
cfg.data.path = "unused"
cfg.parallel.tp, cfg.parallel.pp = tp, pp
t = cfg.train
t.iters, t.seq_length, t.micro_batch_size, t.global_batch_size = 1, SEQ, 2, SAMPLES
t.precision, t.lr, t.min_lr = "fp32", 0.0, 0.0  # weights stay as loaded
cfg.eval.interval = 1
cfg.log.metrics_file = result + ".metrics"
train(cfg, lambda c, layout: Task("eval", forever, lm_loss, eval_batches=samples,
                                  eval_samples=SAMPLES))
if parallel.global_rank() == 0:  # train() has left the process group
    lines = [json.loads(line) for line in open(cfg.log.metrics_file)]
    ours = next(line for line in lines if "eval/loss" in line)
    json.dump({"ours": ours, "reference": reference}, open(result, "w"))
