"""MoE training on CPU processes: expert-parallel layouts give the loss curve of TP1 EP1, with
the router's aux loss off and on, for pretraining, packed SFT and DPO; the first loss is the HF
model's cross-entropy; an interrupted run resumes exactly; a capacity factor drops tokens. All
runs share one torchrun."""

from __future__ import annotations

import json
import math

import pytest
import torch

from converters import hf2mcore, mcore2hf
from converters.hf2mcore import HF2McoreConfig
from converters.mcore2hf import LoraExportConfig, McoreToHFConfig
from mtrain.config.model import load_preset
from mtrain.errors import CheckpointError
from mtrain.models.tiny import write_chat_task, write_corpus, write_preference_task
from tests.torchrun import run_many, torchrun

pytestmark = pytest.mark.slow
ITERS = 6
LAYOUTS = {"tp1ep1": (1, 1, 1), "tp2ep2": (2, 1, 2), "ep2pp2": (1, 2, 2)}  # (tp, pp, ep)
AUX = {"moe.aux_loss_coef": 0.01, "moe.z_loss_coef": 0.001}


def _overrides(root, hf, layout, **extra) -> list[str]:
    tp, pp, ep = LAYOUTS[layout]
    args = {
        "+model": "qwen3_moe_tiny",
        "model.hf_dir": hf,
        "load": root / layout,
        "data.cache_dir": root / "cache",
        "train.iters": ITERS,
        "train.seq_length": 64,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        "train.precision": "fp32",
        "train.lr": 3e-3,
        "parallel.tp": tp,
        "parallel.pp": pp,
        "parallel.ep": ep,
        "device": "cpu",
        **extra,
    }
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="module")
def runs(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_train")
    hf = tiny_hf(load_preset("qwen3_moe_tiny").spec())
    write_corpus(root / "corpus.jsonl", 2000, seed=1)
    write_chat_task(root / "chat.jsonl", length=3)
    write_preference_task(root / "pairs.jsonl")
    for name, (tp, pp, ep) in LAYOUTS.items():
        hf2mcore.convert(
            HF2McoreConfig(hf_dir=str(hf), out_dir=str(root / name), tp=tp, pp=pp, ep=ep)
        )
    pt = {"data.path": root / "corpus.jsonl"}
    sft = {"data.path": root / "chat.jsonl", "data.packing": "true"}
    plan = {}
    for layout in LAYOUTS:
        plan[f"pt-{layout}"] = ["pt", _overrides(root, hf, layout, **pt)]
        plan[f"pt-aux-{layout}"] = ["pt", _overrides(root, hf, layout, **pt, **AUX)]
        plan[f"sft-aux-{layout}"] = ["sft", _overrides(root, hf, layout, **sft, **AUX)]
    plan["sft-tp1ep1"] = ["sft", _overrides(root, hf, "tp1ep1", **sft)]
    plan["sft-tp2ep2"] = ["sft", _overrides(root, hf, "tp2ep2", **sft)]
    lora = {**sft, "finetuning_type": "lora", "lora.r": 4, "lora.alpha": 8}
    plan["lora-tp1ep1"] = ["sft", _overrides(root, hf, "tp1ep1", **lora)]
    plan["lora-tp2ep2"] = ["sft", _overrides(root, hf, "tp2ep2", **lora, save=root / "lora")]
    dpo = {"data.path": root / "pairs.jsonl", "train.lr": 1e-3, **AUX}
    plan["dpo-tp1ep1"] = ["dpo", _overrides(root, hf, "tp1ep1", **dpo)]
    plan["dpo-tp2ep2"] = ["dpo", _overrides(root, hf, "tp2ep2", **dpo)]
    recompute = {**dpo, "train.recompute": "full"}  # router losses added in the backward only
    plan["dpo-recompute-tp2ep2"] = ["dpo", _overrides(root, hf, "tp2ep2", **recompute)]
    capped = {**pt, "moe.capacity_factor": 1.0}
    plan["pt-capacity-tp2ep2"] = ["pt", _overrides(root, hf, "tp2ep2", **capped)]
    save = {"save": root / "resumed", "checkpoint.save_interval": 2, **pt, **AUX}
    plan["part1"] = ["pt", _overrides(root, hf, "tp2ep2", **save, **{"train.exit_after_iters": 3})]
    plan["part2"] = ["pt", _overrides(root, hf, "tp2ep2", **save)]
    return run_many(4, plan, root, timeout=900)[0], root, hf


def curve(history: list[dict], key: str = "loss") -> list[float]:
    return [h[key] for h in history]


@pytest.mark.parametrize("run", ["pt", "pt-aux", "sft-aux"])
@pytest.mark.parametrize("layout", ["tp2ep2", "ep2pp2"])
def test_expert_parallel_curves_equal_tp1_ep1(runs, run, layout):
    results = runs[0]
    ref, got = results[f"{run}-tp1ep1"], results[f"{run}-{layout}"]
    assert len(ref) == len(got) == ITERS
    for key in ["loss", "grad_norm"] + (["moe_aux_loss", "moe_z_loss"] if "aux" in run else []):
        diffs = [abs(a - b) for a, b in zip(curve(ref, key), curve(got, key))]
        assert max(diffs) < 1e-4 * max(1.0, abs(curve(ref, key)[0])), (key, diffs)
    assert curve(ref, "expert_load_max") == pytest.approx(curve(got, "expert_load_max"), abs=1e-6)


def test_packed_sft_without_aux_loss_equals_tp1_ep1(runs):
    ref, got = runs[0]["sft-tp1ep1"], runs[0]["sft-tp2ep2"]
    diffs = [abs(a - b) for a, b in zip(curve(ref), curve(got))]
    assert len(diffs) == ITERS and max(diffs) < 1e-4, diffs


def test_aux_loss_changes_training_and_is_reported(runs):
    plain, aux = runs[0]["pt-tp1ep1"], runs[0]["pt-aux-tp1ep1"]
    assert "moe_aux_loss" not in plain[0] and aux[0]["moe_aux_loss"] >= 1.0  # 1 = balanced
    assert curve(plain)[0] == pytest.approx(curve(aux)[0], abs=1e-6)  # the LM loss alone
    assert curve(plain)[-1] != pytest.approx(curve(aux)[-1], abs=1e-6)
    assert all(h["expert_load_max"] >= 1.0 for h in aux)


def test_first_loss_is_the_hf_models_cross_entropy(runs):
    from transformers import AutoModelForCausalLM

    from mtrain.config.schema import TrainingCommandConfig  # noqa: F401 (config classes)
    from mtrain.data.pt import build_pt_dataset
    from mtrain.data.sampler import micro_batches
    from mtrain.pt import PTConfig

    results, root, hf = runs
    cfg = PTConfig()
    cfg.data.path, cfg.data.cache_dir = str(root / "corpus.jsonl"), str(root / "cache")
    dataset = build_pt_dataset(cfg.data, str(hf), 64, ITERS * 8, cfg.train.seed)
    step = micro_batches(dataset, 0, 2, 8, 0, 1)
    batch = [next(step) for _ in range(4)]
    tokens = torch.cat([b["tokens"] for b in batch])
    labels = torch.cat([b["labels"] for b in batch])
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        logits = model(tokens).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    assert results["pt-tp1ep1"][0]["loss"] == pytest.approx(expected, abs=1e-5)


def test_lora_on_attention_and_every_expert_trains_the_same_at_tp2_ep2(runs):
    ref, got = runs[0]["lora-tp1ep1"], runs[0]["lora-tp2ep2"]
    for key in ("loss", "grad_norm"):
        diffs = [abs(a - b) for a, b in zip(curve(ref, key), curve(got, key))]
        assert len(diffs) == ITERS and max(diffs) < 1e-4, (key, diffs)
    assert curve(ref)[-1] < curve(ref)[0] - 0.1


def test_lora_merged_export_reproduces_the_trained_models_logits(runs, tmp_path):
    _, root, _ = runs
    merged = tmp_path / "merged"
    mcore2hf.convert(McoreToHFConfig(ckpt_dir=str(root / "lora"), out_dir=str(merged)))
    state = torch.load(
        root / "lora" / "iter_0000006" / "mp_rank_01_001" / "model_optim_rng.pt",
        weights_only=False,
    )["model"]
    expert_b = state["decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.lora_B.weight"]
    assert expert_b.abs().max() > 0  # the experts' adapters trained
    # The adapter checkpoint (base + adapters at TP2 EP2) against HF's forward of the export.
    torchrun("parity.py", 4, tmp_path / "result.json", merged, root / "lora")
    diff = json.loads((tmp_path / "result.json").read_text())[str(root / "lora")]
    assert diff < 1e-5, diff


def test_peft_export_of_expert_adapters_is_refused_by_name(runs, tmp_path):
    with pytest.raises(CheckpointError, match="cannot carry LoRA on linear_fc1, linear_fc2"):
        mcore2hf.convert(
            McoreToHFConfig(
                ckpt_dir=str(runs[1] / "lora"),
                out_dir=str(tmp_path / "peft"),
                lora=LoraExportConfig(merge=False),
            )
        )


def test_interrupted_and_resumed_equals_uninterrupted(runs):
    results, root, _ = runs
    first, second = results["part1"], results["part2"]
    assert len(first) == 3 and [h["iteration"] for h in second] == [4, 5, 6]
    assert (root / "resumed" / "iter_0000006" / "mp_rank_01_001").is_dir()  # Megatron-LM names
    full = curve(results["pt-aux-tp2ep2"])
    assert curve(first + second) == pytest.approx(full, abs=1e-6)


def test_dpo_with_experts_at_tp2_ep2_equals_tp1_ep1(runs):
    """DPO (aux and z losses on) on the MoE model: the policy starts as the reference (log 2),
    and the expert-parallel layout gives the same loss, margins and gradient norms, with full
    recompute too (whose router losses exist only in the recomputed forward)."""
    ref = runs[0]["dpo-tp1ep1"]
    assert ref[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for run in ("dpo-tp2ep2", "dpo-recompute-tp2ep2"):
        got = runs[0][run]
        for key in ("loss", "rewards/margin", "grad_norm", "moe_aux_loss"):
            diffs = [abs(a - b) for a, b in zip(curve(ref, key), curve(got, key))]
            scale = max(1.0, abs(curve(ref, key)[0]))
            assert len(diffs) == ITERS and max(diffs) < 1e-4 * scale, (run, key, diffs)


def test_dpo_gradient_with_router_losses_equals_plain_pytorch(runs):
    """DPO's first step on the MoE model with the aux and z losses on: its gradient norm is
    plain PyTorch's on HF's model for the mean DPO loss over the global batch's pairs plus, per
    MoE layer, each router loss (megatron's formulas) times its coefficient, averaged over the
    micro-batches (one per DP rank here). The router terms once weighed 2 x seq_length more."""
    from transformers import AutoModelForCausalLM

    from mtrain.data.epochs import Epochs
    from mtrain.data.pairs import build_pair_datasets
    from mtrain.data.sampler import micro_batches
    from mtrain.dpo import DPOConfig

    results, root, hf = runs
    cfg = DPOConfig()
    cfg.data.path, cfg.data.cache_dir = str(root / "pairs.jsonl"), str(root / "cache")
    pairs, _ = build_pair_datasets(cfg.data, str(hf), 64, cfg.train.seed)
    ordered = Epochs(pairs, ITERS * 8, cfg.train.seed)
    batches = [next(micro_batches(ordered, 0, 2, 8, rank, 4)) for rank in range(4)]
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    experts, topk = model.config.num_experts, model.config.num_experts_per_tok
    coef, z_coef = AUX["moe.aux_loss_coef"], AUX["moe.z_loss_coef"]
    dpo_losses, router_losses, aux_values = [], [], []
    for batch in batches:
        rows = {k: v.flatten(0, 1) for k, v in batch.items() if v.dim() == 3}
        # HF's default positions 0..S-1: megatron's rotary embedding numbers a row so (the
        # restart at the padding in position_ids would reach only absolute embeddings), and the
        # padding tokens are routed too, so their router logits must be the same numbers.
        out = model(rows["tokens"], output_router_logits=True)
        token_logps = -torch.nn.functional.cross_entropy(
            out.logits.flatten(0, 1), rows["labels"].flatten(), reduction="none"
        ).view_as(rows["labels"])
        logps = (token_logps * rows["loss_mask"]).sum(-1).view(-1, 2)
        margin = logps[:, 0] - logps[:, 1]  # the reference's margin is the same at step 1
        dpo_losses.append(-torch.nn.functional.logsigmoid(0.1 * (margin - margin.detach())))
        for logits in out.router_logits:
            probs = logits.float().softmax(-1)
            counts = torch.bincount(probs.topk(topk).indices.flatten(), minlength=experts)
            aux = experts / (len(probs) ** 2 * topk) * (probs.sum(0) * counts).sum()
            z = logits.float().logsumexp(-1).square().mean()
            router_losses.append(coef * aux + z_coef * z)
            aux_values.append(aux.item())
    objective = torch.cat(dpo_losses).mean() + sum(router_losses) / len(batches)
    objective.backward()
    norm = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))
    first = results["dpo-tp1ep1"][0]
    assert first["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    assert first["moe_aux_loss"] == pytest.approx(sum(aux_values) / len(aux_values), rel=1e-5)


def test_a_capacity_factor_drops_tokens_and_trains(runs):
    """moe.capacity_factor=1.0: each expert takes at most its even share of a rank's tokens, so
    the tiny model's uneven router drops some, and the first loss is no longer the dropless one."""
    dropless, capped = runs[0]["pt-tp2ep2"], runs[0]["pt-capacity-tp2ep2"]
    assert len(capped) == ITERS and all(math.isfinite(h["loss"]) for h in capped)
    assert abs(capped[0]["loss"] - dropless[0]["loss"]) > 1e-5
    assert curve(capped)[-1] < curve(capped)[0]
