"""Worker: a trained reward model in megatron-core vs its HF export in transformers.

    torchrun --nproc_per_node 4 tests/dist/rm_parity.py RESULT.json HF_DIR CKPT [HF_DIR CKPT ...]

A fixed batch of 4 pairs of random token sequences, padded at the end with the pad id, with
margins and a centring term; one forward-backward through the trainer's model at the
checkpoint's TP x PP (full, or LoRA adapters on their base). Compared with transformers'
Qwen3ForSequenceClassification (its own last-non-pad pooling) on the same batch: every reward,
the loss and, for a full checkpoint, every parameter's gradient gathered into HF layout.
RESULT.json gets one result per (HF_DIR, CKPT), in order.
"""

import json
import sys

import torch
import torch.nn.functional as F

PAIRS, SEQ, MICRO, CENTER = 4, 24, 2, 0.1


def fixed_batch(vocab: int, pad: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab - 1, (PAIRS, 2, SEQ), generator=g)
    tokens[tokens >= pad] += 1  # no pad id inside a sequence
    for i in range(PAIRS):
        for j in range(2):
            tokens[i, j, SEQ - (i + 2 * j) % 5 :] = pad  # different lengths, padded at the end
    return {
        "tokens": tokens,
        "position_ids": torch.arange(SEQ).expand(PAIRS, 2, SEQ).contiguous(),
        "margin": torch.rand(PAIRS, generator=g),
    }


def hf_reference(hf_dir: str, batch) -> tuple[torch.Tensor, float, dict]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32)
    rewards = model(batch["tokens"].view(-1, SEQ)).logits.squeeze(-1).view(PAIRS, 2)
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    loss = -F.logsigmoid(chosen - rejected - batch["margin"]) + CENTER * (chosen + rejected) ** 2
    loss = loss.mean()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return rewards.detach(), loss.item(), grads


def main() -> None:
    result_path, *dirs = sys.argv[1:]
    from transformers import AutoConfig

    cases = []
    for hf_dir, ckpt_dir in zip(dirs[::2], dirs[1::2]):
        config = AutoConfig.from_pretrained(hf_dir)
        batch = fixed_batch(config.vocab_size, config.pad_token_id)
        cases.append((ckpt_dir, config.pad_token_id, batch, hf_reference(hf_dir, batch)))

    from mtrain import accel, parallel  # the CPU shim after every HF model has run
    from mtrain.checkpoint import MegatronCheckpoint

    first = MegatronCheckpoint.open(cases[0][0])
    accel.activate("cpu")
    parallel.init(first.tp, first.pp)
    results = [compare(ckpt_dir, pad, batch, *want) for ckpt_dir, pad, batch, want in cases]
    if torch.distributed.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)
    parallel.shutdown()


def compare(ckpt_dir, pad, batch, want_rewards, want_loss, want_grads) -> dict:
    from megatron.core import parallel_state as ps

    from mtrain.checkpoint import MegatronCheckpoint, load_model_weights
    from mtrain.config.model import load_preset
    from mtrain.config.schema import TrainingCommandConfig
    from mtrain.models.score import reward_forward
    from mtrain.models.sharding import Dims, merge
    from mtrain.models.stages import stage_groups
    from mtrain.plan import ParallelPlan
    from mtrain.reward import make_reward_loss
    from mtrain.schedule import run_schedule
    from mtrain.trainer import Setup, Task, _build

    ckpt = MegatronCheckpoint.open(ckpt_dir)
    model_cfg = load_preset("qwen3_tiny")
    for key, value in vars(ckpt.spec).items():
        setattr(model_cfg, key, value)
    cfg = TrainingCommandConfig(model=model_cfg)
    if ckpt.lora is not None:
        cfg.finetuning_type, cfg.lora = "lora", ckpt.lora.config
    cfg.train.precision, cfg.train.seq_length, cfg.train.micro_batch_size = "fp32", SEQ, MICRO
    cfg.train.global_batch_size, cfg.train.iters = PAIRS, 1
    dp = torch.distributed.get_world_size() // (ckpt.tp * ckpt.pp)
    plan = ParallelPlan.build(ckpt.tp, ckpt.pp, dp * ckpt.tp * ckpt.pp, micro_batch_size=MICRO,
                              global_batch_size=PAIRS)  # fmt: skip
    task = Task(name="rm", batches=None, loss=None, rows_per_sample=2, head="score")
    model, _, _, _ = _build(cfg, Setup(ckpt.spec, plan, "local"), task)
    load_model_weights(model, ckpt_dir, ckpt.spec, ckpt.tp, ckpt.pp)
    for m in model:
        m.zero_grad_buffer()
    rewards = []
    loss_fn = make_reward_loss(CENTER)

    def capture(b, out):
        rewards.append(out.detach().view(-1, 2))
        return loss_fn(b, out)

    dp_rank = ps.get_data_parallel_rank()
    mine = [{k: v[i : i + MICRO] for k, v in batch.items()}
            for i in range(MICRO * dp_rank, PAIRS, MICRO * dp)]  # fmt: skip
    sums = run_schedule(model, [iter(mine)], reward_forward(pad), capture, plan.micro_batches,
                        SEQ, 2 * MICRO, forward_only=False)  # fmt: skip
    loss = (sums[0, 0] / sums[0, 1]).item()
    grads = {}
    if ckpt.lora is None:
        params = dict(model[0].module.named_parameters())
        dims = Dims.of(ckpt.spec, ckpt.tp)
        pp_rank = ps.get_pipeline_model_parallel_rank()
        for group in stage_groups(ckpt.spec, ckpt.pp, 1, pp_rank, 0, head="score"):
            for p in group:
                local = params[p.mcore].main_grad.contiguous()
                shards = [torch.empty_like(local) for _ in range(ckpt.tp)]
                torch.distributed.all_gather(
                    shards, local, group=ps.get_tensor_model_parallel_group()
                )
                grads.update(zip(p.hf, merge(p.entry, shards, dims)))
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, (grads, [r.tolist() for r in rewards]))
    merged = {k: v for part, _ in everyone for k, v in part.items()}
    got_rewards = torch.tensor(next(r for _, r in everyone if r)).view(PAIRS, 2)
    result = {
        "rewards": (got_rewards - want_rewards).abs().max().item(),
        "reward_scale": want_rewards.abs().max().item(),
        "loss": abs(loss - want_loss),
        "loss_value": want_loss,
    }
    if ckpt.lora is None:
        assert set(merged) == set(want_grads), sorted(set(want_grads) ^ set(merged))
        result["grad"] = max((merged[k] - want_grads[k]).abs().max().item() for k in want_grads)
        result["grad_scale"] = max(g.abs().max().item() for g in want_grads.values())
    return result


if __name__ == "__main__":
    main()
