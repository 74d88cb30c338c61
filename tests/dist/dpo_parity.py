"""Worker: the DPO-family losses and their gradients in megatron-core vs plain PyTorch on the
HF model (DPO's sigmoid / ipo / hinge, SimPO, ORPO and KTO in one launch).

    torchrun --nproc_per_node 4 tests/dist/dpo_parity.py RESULT.json HF_DIR CKPT

A fixed batch of 4 pairs of random token sequences with response masks and arbitrary reference
log-probs; for each loss kind, one forward-backward through the trainer's model (DDP, per-pair
loss normalisation, finalize_model_grads) at the checkpoint's TP x PP, then every parameter's
gradient is gathered into HF layout and compared with torch.autograd on the HF model.
"""

import json
import sys

import torch
import torch.nn.functional as F

PAIRS, SEQ, PROMPT = 4, 24, 10
KINDS = {  # name: (loss, beta, label_smoothing, sft_weight, gamma)
    "sigmoid": ("sigmoid", 0.5, 0.1, 0.3, 0.0),
    "ipo": ("ipo", 0.5, 0.0, 0.0, 0.0),
    "hinge": ("hinge", 0.5, 0.0, 0.0, 0.0),
    "simpo": ("simpo", 2.0, 0.1, 0.0, 0.6),
    "orpo": ("orpo", 0.3, 0.0, 0.0, 0.0),
    "kto": ("kto", 0.4, 1.3, 0.7, 0.0),  # for kto: (beta, desirable_weight, undesirable_weight)
}
MICRO = 2  # pairs per micro-batch (KTO's KL estimate is per micro-batch)


def fixed_batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (PAIRS, 2, SEQ), generator=g)
    tokens[:, 1, :PROMPT] = tokens[:, 0, :PROMPT]  # chosen and rejected share the prompt
    labels = torch.roll(tokens, -1, dims=-1)
    mask = torch.zeros(PAIRS, 2, SEQ)
    for i in range(PAIRS):
        for j in range(2):
            end = SEQ - 1 - (i + j) % 3  # responses of different lengths, then padding
            mask[i, j, PROMPT - 1 : end] = 1.0  # the positions whose next token is the response
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": mask,
        "position_ids": torch.arange(SEQ).expand(PAIRS, 2, SEQ).contiguous(),
        "ref_logps": -40.0 + 5.0 * torch.randn(PAIRS, 2, generator=g),
        "label": torch.tensor([1.0, 0.0, 0.0, 1.0]),  # KTO: row 0 desirable or not
    }


def reference_loss(model, batch, kind, beta, smoothing, sft_weight, gamma) -> torch.Tensor:
    """The losses written out on the HF model's full logits."""
    logits = model(batch["tokens"].view(-1, SEQ)).logits.float()
    token_logps = torch.log_softmax(logits, -1).gather(-1, batch["labels"].view(-1, SEQ, 1))
    mask = batch["loss_mask"].view(-1, SEQ)
    logps = (token_logps.squeeze(-1) * mask).sum(-1).view(PAIRS, 2)
    lengths = mask.view(PAIRS, 2, SEQ).sum(-1)
    ref = batch["ref_logps"]
    if kind == "kto":  # (beta, desirable_weight, undesirable_weight) = (beta, smoothing, sft)
        losses = []
        for i in range(0, PAIRS, MICRO):
            at = slice(i, i + MICRO)
            kl = (logps[at, 1] - ref[at, 1]).mean().detach().clamp(min=0)
            ratio = logps[at, 0] - ref[at, 0]
            good = batch["label"][at] > 0
            losses.append(torch.where(
                good, smoothing * (1 - torch.sigmoid(beta * (ratio - kl))),
                sft_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
            ))  # fmt: skip
        return torch.cat(losses).mean()
    avg = logps / lengths
    if kind == "simpo":
        z = beta * (avg[:, 0] - avg[:, 1]) - gamma
        return (-(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z)).mean()
    if kind == "orpo":
        p = avg.exp()
        odds = (avg[:, 0] - avg[:, 1]) - (torch.log1p(-p[:, 0]) - torch.log1p(-p[:, 1]))
        return (-avg[:, 0] - beta * F.logsigmoid(odds)).mean()
    h = (logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1])
    if kind == "sigmoid":
        loss = -(1 - smoothing) * F.logsigmoid(beta * h) - smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        loss = torch.clamp(1 - beta * h, min=0)
    loss = loss - sft_weight * logps[:, 0] / lengths[:, 0]
    return loss.mean()


def megatron_loss(kind, beta, smoothing, sft_weight, gamma):
    from mtrain.losses import make_dpo_loss, make_kto_loss

    if kind == "kto":
        return make_kto_loss(beta, smoothing, sft_weight)
    return make_dpo_loss(kind, beta, smoothing, sft_weight, gamma)


def hf_reference(hf_dir: str, batch) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = {}
    for name, args in KINDS.items():
        model.zero_grad()
        loss = reference_loss(model, batch, *args)
        loss.backward()
        out[name] = (loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()})
    return out


def main() -> None:
    result_path, hf_dir, ckpt_dir = sys.argv[1:]
    from transformers import AutoConfig

    batch = fixed_batch(AutoConfig.from_pretrained(hf_dir).vocab_size)
    expected = hf_reference(hf_dir, batch)  # before the CPU shim

    from megatron.core import parallel_state as ps

    from mtrain.models.sharding import Dims, merge
    from mtrain.models.stages import stage_groups
    from mtrain import accel, parallel
    from mtrain.checkpoint import MegatronCheckpoint, load_model_weights
    from mtrain.config.model import load_preset
    from mtrain.config.schema import TrainingCommandConfig
    from mtrain.losses import pair_forward
    from mtrain.plan import ParallelPlan
    from mtrain.schedule import run_schedule
    from mtrain.trainer import Setup, Task, _build

    ckpt = MegatronCheckpoint.open(ckpt_dir)
    accel.activate("cpu")
    parallel.init(ckpt.tp, ckpt.pp)
    model_cfg = load_preset("qwen3_tiny")
    for key, value in vars(ckpt.spec).items():
        setattr(model_cfg, key, value)
    cfg = TrainingCommandConfig(model=model_cfg)
    cfg.train.precision, cfg.train.seq_length, cfg.train.micro_batch_size = "fp32", SEQ, MICRO
    cfg.train.global_batch_size, cfg.train.iters = PAIRS, 1
    dp = torch.distributed.get_world_size() // (ckpt.tp * ckpt.pp)
    plan = ParallelPlan.build(ckpt.tp, ckpt.pp, dp * ckpt.tp * ckpt.pp, micro_batch_size=2,
                              global_batch_size=PAIRS)  # fmt: skip
    task = Task(name="dpo", batches=None, loss=None, forward=pair_forward, rows_per_sample=2)
    model, _, _, _ = _build(cfg, Setup(ckpt.spec, plan, "local"), task)
    load_model_weights(model, ckpt_dir, ckpt.spec, ckpt.tp, ckpt.pp)
    dp_rank = ps.get_data_parallel_rank()
    mine = [{k: v[i : i + 2] for k, v in batch.items()} for i in range(2 * dp_rank, PAIRS, 2 * dp)]
    dims = Dims.of(ckpt.spec, ckpt.tp)
    results = {}
    for name, args in KINDS.items():
        for m in model:
            m.zero_grad_buffer()
        sums = run_schedule(
            model, [iter(mine)], pair_forward, megatron_loss(*args), plan.micro_batches, SEQ,
            2 * MICRO, forward_only=False,
        )  # fmt: skip
        loss = sums[0, 0] / sums[0, 1]
        params = dict(model[0].module.named_parameters())
        grads = {}
        for group in stage_groups(ckpt.spec, ckpt.pp, 1, ps.get_pipeline_model_parallel_rank(), 0):
            for p in group:
                local = params[p.mcore].main_grad.contiguous()
                shards = [torch.empty_like(local) for _ in range(ckpt.tp)]
                torch.distributed.all_gather(
                    shards, local, group=ps.get_tensor_model_parallel_group()
                )
                grads.update(zip(p.hf, merge(p.entry, shards, dims)))
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, grads)
        merged = {k: v for part in everyone for k, v in part.items()}
        want_loss, want_grads = expected[name]
        assert set(merged) == set(want_grads), sorted(set(want_grads) ^ set(merged))
        scale = max(g.abs().max().item() for g in want_grads.values())
        results[name] = {
            "loss": abs(loss.item() - want_loss),
            "loss_value": want_loss,
            "grad": max((merged[k] - want_grads[k]).abs().max().item() for k in want_grads),
            "grad_scale": scale,
        }
    if torch.distributed.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)
    parallel.shutdown()


if __name__ == "__main__":
    main()
