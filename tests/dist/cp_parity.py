"""Worker: context parallelism gives the HF model's loss and every parameter's gradient, for
pretraining rows, packed SFT rows and DPO pairs, at several layouts in one set of processes.

    torchrun --nproc_per_node 4 tests/dist/cp_parity.py RESULT.json HF_DIR CKPT_ROOT CASE...

CASE is `tpT-ppP-cpC-KERNELS[-OPTION...]` (CKPT_ROOT/tpT-ppP holds the converted weights;
OPTION: full or selective recompute, sp for sequence parallelism); processes beyond
T*P*C are data parallel. Each case runs one forward-backward per task through the trainer's own
pieces (DDP, per-token loss normalisation, finalize_model_grads, the metric reduction); the
gradients are gathered into HF layout and compared with torch.autograd on the HF model, which
sees whole sequences (a packed row as its samples alone). For kernels=torch_npu, PYTHONPATH must
hold tests/npu_emulation.
"""

import json
import sys

import torch
import torch.nn.functional as F
from dpo_parity import fixed_batch as dpo_batch  # noqa: E402 (tests/dist is the script's dir)
from dpo_parity import reference_loss as dpo_reference_loss

SEQ, ROWS = 32, 4
CU = torch.tensor([[0, 7, 16, 32], [0, 12, 25, 32], [0, 32, 32, 32], [0, 5, 9, 32]])
DPO = ("sigmoid", 0.5, 0.1, 0.3, 0.0)  # kind, beta, smoothing, sft_weight, gamma


def lm_batch(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (ROWS, SEQ), generator=g)
    return {
        "tokens": tokens,
        "labels": torch.randint(0, vocab, (ROWS, SEQ), generator=g),
        "loss_mask": (torch.rand(ROWS, SEQ, generator=g) > 0.3).float(),
        "position_ids": torch.arange(SEQ).expand(ROWS, SEQ).contiguous(),
    }


def hf_lm_loss(model, batch, cu=None) -> torch.Tensor:
    """Mean token cross-entropy over the loss tokens; a packed row's samples each run alone."""
    total = torch.zeros(())
    for r in range(ROWS):
        bounds = cu[r].tolist() if cu is not None else [0, SEQ]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b == a:
                continue
            logits = model(batch["tokens"][r : r + 1, a:b]).logits.float()[0]
            ce = F.cross_entropy(logits, batch["labels"][r, a:b], reduction="none")
            total = total + (ce * batch["loss_mask"][r, a:b]).sum()
    return total / batch["loss_mask"].sum()


def hf_references(hf_dir: str, batches: dict) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    losses = {
        "pt": lambda: hf_lm_loss(model, batches["pt"]),
        "packed": lambda: hf_lm_loss(model, batches["packed"], CU),
        "dpo": lambda: dpo_reference_loss(model, batches["dpo"], *DPO),
    }
    out = {}
    for name, loss_fn in losses.items():
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        out[name] = (loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()})
    return out


def gathered_grads(model, spec, tp: int, pp: int) -> dict[str, torch.Tensor]:
    """Every parameter's reduced gradient (main_grad), in HF names and layout, on every rank."""
    from megatron.core import parallel_state as ps

    from mtrain.models.sharding import Dims, merge
    from mtrain.models.stages import stage_groups

    params = dict(model[0].module.named_parameters())
    grads = {}
    for group in stage_groups(spec, pp, 1, ps.get_pipeline_model_parallel_rank(), 0):
        for p in group:
            local = params[p.mcore].main_grad.contiguous()
            shards = [torch.empty_like(local) for _ in range(tp)]
            torch.distributed.all_gather(shards, local, group=ps.get_tensor_model_parallel_group())
            grads.update(zip(p.hf, merge(p.entry, shards, Dims.of(spec, tp))))
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, grads)
    return {k: v for part in everyone for k, v in part.items()}


def run_case(case: str, ckpt_root: str, batches: dict, expected: dict) -> dict:
    from mtrain import kernels as kernel_choices
    from mtrain import parallel
    from mtrain.checkpoint import MegatronCheckpoint, load_model_weights
    from mtrain.config.model import load_preset
    from mtrain.config.schema import TrainingCommandConfig
    from mtrain.data.packing import block_causal_mask
    from mtrain.losses import (
        lm_loss,
        lm_loss_and_accuracy,
        logits_forward,
        make_dpo_loss,
        pair_forward,
    )
    from mtrain.plan import ParallelPlan
    from mtrain.schedule import run_schedule
    from mtrain.trainer import Setup, Task, _build

    parts = case.split("-")
    tp, pp, cp = (int(part[2:]) for part in parts[:3])
    kernels, options = parts[3], parts[4:]
    recompute = next((o for o in options if o in ("full", "selective")), None)
    sp = "sp" in options
    ckpt_dir = f"{ckpt_root}/tp{tp}-pp{pp}"
    spec = MegatronCheckpoint.open(ckpt_dir).spec
    parallel.init(tp, pp, cp=cp)
    world = torch.distributed.get_world_size()
    dp, dp_rank = parallel.dp_size(), parallel.dp_rank()
    model_cfg = load_preset("qwen3_tiny")
    for key, value in vars(spec).items():
        setattr(model_cfg, key, value)
    cfg = TrainingCommandConfig(model=model_cfg, kernels=kernels, device="cpu")
    cfg.train.precision, cfg.train.seq_length, cfg.train.iters = "fp32", SEQ, 1
    cfg.train.recompute = recompute
    cfg.parallel.cp, cfg.parallel.sequence_parallel = cp, sp
    plan = ParallelPlan.build(tp, pp, world, global_batch_size=ROWS, cp=cp, sequence_parallel=sp)
    cu_masks = kernel_choices.cu_seqlens_masks(kernels, cfg.npu)
    results, kept = {}, {}
    for name in ("pt", "packed", "dpo"):
        packed, pairs = name == "packed", name == "dpo"
        task = Task(name=name, batches=None, loss=None, attention_mask=packed)
        if pairs:
            task.forward, task.rows_per_sample = pair_forward, 2
        model, _, _, _ = _build(cfg, Setup(spec, plan, kernels), task)
        load_model_weights(model, ckpt_dir, spec, tp, pp)
        batch = batches[name]
        rows = []
        for r in range(dp_rank, ROWS, dp):  # this DP rank's rows, one per micro-batch
            row = {k: v[r : r + 1] for k, v in batch.items()}
            if packed:
                cu = CU[r : r + 1].to(torch.int32)
                row["attention_mask"] = cu if cu_masks else block_causal_mask(cu, SEQ)
            rows.append(row)
        for m in model:
            m.zero_grad_buffer()
        seq = batch["tokens"].shape[-1]
        loss_fn = make_dpo_loss(*DPO) if pairs else lm_loss
        sums = run_schedule(
            model, [iter(rows)], task.forward, loss_fn, len(rows), seq,
            task.rows_per_sample, forward_only=False,
        )  # fmt: skip
        loss = (sums[0, 0] / sums[0, 1]).item()
        grads = gathered_grads(model, spec, tp, pp)
        if not pairs:  # validation's path: logits, loss and accuracy, forward only
            with torch.no_grad():
                evaluated = run_schedule(
                    model, [iter(rows)], logits_forward, lm_loss_and_accuracy, len(rows), seq,
                    1, forward_only=True,
                )  # fmt: skip
            results_eval = (evaluated[0, 0] / evaluated[0, 1]).item()
        want_loss, want_grads = expected[name]
        assert set(grads) == set(want_grads), sorted(set(want_grads) ^ set(grads))
        results[name] = {
            "eval_loss": results_eval if not pairs else want_loss,
            "loss": loss,
            "hf_loss": want_loss,
            "grad_diff": max((grads[k] - want_grads[k]).abs().max().item() for k in want_grads),
            "grad_scale": max(g.abs().max().item() for g in want_grads.values()),
        }
        kept[name] = (loss, grads)
    parallel.destroy()
    return results, kept


def main() -> None:
    result_path, hf_dir, ckpt_root, *cases = sys.argv[1:]
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(hf_dir).vocab_size
    batches = {"pt": lm_batch(vocab, 0), "packed": lm_batch(vocab, 1), "dpo": dpo_batch(vocab)}
    expected = hf_references(hf_dir, batches)  # before the CPU shim

    from mtrain import accel, parallel

    accel.activate("cpu")
    parallel.init_process_group()
    results, first = {}, None
    for case in cases:  # the first case is the reference layout (CP1)
        results[case], kept = run_case(case, ckpt_root, batches, expected)
        first = first or kept
        for name, (loss, grads) in kept.items():
            ref_loss, ref_grads = first[name]
            results[case][name]["loss_vs_first"] = abs(loss - ref_loss)
            results[case][name]["grad_vs_first"] = max(
                (grads[k] - ref_grads[k]).abs().max().item() for k in grads
            )
    if torch.distributed.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)
    parallel.shutdown()


if __name__ == "__main__":
    main()
