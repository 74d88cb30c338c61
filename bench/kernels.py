"""Training-step throughput of each layer implementation (`kernels=`) on this device, side by side.

    python bench/kernels.py [--device auto] [--kernels local,sdpa,te] [--packed] [--precision bf16]

Builds the same Qwen3-shaped model once per kernels choice (same seed; the weights of `local` are
then loaded into every other build, so that all run exactly the same model) and checks its logits
against `local` on one fixed batch (eval, no grad). Then it times forward + backward of the
per-token loss on that batch: after a warm-up, round by round, one step of every variant per
round, so that drift of the machine falls on all alike (every model stays on the device).
Reports per kernels: tokens/s from the median step, its ratio to `local`, the device memory one
training step of that model needs (its parameters plus the most its forward and backward
allocated: gradients, activations; n/a on CPU, which has no device allocator) and the max
|logits - local|. Expect ~1e-5 in fp32 and ~1e-2 in bf16.

Choices: `local` always (the reference); `sdpa` on any device; `te` on CUDA with
transformer_engine installed; `torch_npu` on Ascend. `mindspeed` is not compared here: MindSpeed
patches megatron for the whole process, `local` included, so it needs a run of its own.

`--packed` makes every row `--segments` samples back to back (mtrain.data.packing's row format)
and builds with `explicit_attention_mask=True`; each kernels gets the mask the SFT data gives
it: the rows' cu_seqlens where the kernels run packed rows as varlen sequences, else the dense
block-causal mask.

Defaults fit the device: a small model on CPU (well under a minute), a 4-layer slice of
Qwen3-1.7B at seq 4096 in bf16 on an accelerator.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtrain import accel, parallel  # noqa: E402
from mtrain.config.kernels import NpuConfig  # noqa: E402
from mtrain.data.packing import block_causal_mask, sequence  # noqa: E402
from mtrain.errors import ConfigError  # noqa: E402
from mtrain.kernels import check, resolve_kernels  # noqa: E402
from mtrain.models.spec import ModelSpec  # noqa: E402

GiB = 2**30
SEED = 1234
# Model, batch and step counts per device when not given on the command line.
DEFAULTS = {
    "cpu": dict(
        layers=2,
        hidden=512,
        heads=8,
        kv_heads=4,
        head_dim=64,
        ffn=1536,
        vocab=8192,
        seq=512,
        batch=2,
        steps=5,
        warmup=1,
        precision="fp32",
    ),
    "accelerator": dict(  # Qwen3-1.7B's widths, 4 of its 28 layers
        layers=4,
        hidden=2048,
        heads=16,
        kv_heads=8,
        head_dim=128,
        ffn=6144,
        vocab=151936,
        seq=4096,
        batch=2,
        steps=10,
        warmup=3,
        precision="bf16",
    ),
}


# --- device specifics: the active backend's name picks the call -----------------------------


def synchronize() -> None:
    """Wait for the device's queued work, so that host timestamps bound it (CPU: nothing queued)."""
    name = accel.current().NAME
    if name == "cuda":
        torch.cuda.synchronize()
    elif name == "npu":
        torch.npu.synchronize()  # type: ignore[attr-defined]


def memory_module():
    """torch.cuda / torch.npu for their allocator statistics; None on CPU, which has no device
    allocator (and one process's RSS, holding every variant, says nothing about one of them)."""
    name = accel.current().NAME
    if name == "cuda":
        return torch.cuda
    if name == "npu":
        return torch.npu  # type: ignore[attr-defined]
    return None


# --- choices, model, batch ------------------------------------------------------------------


def kernel_choices(requested: str | None, device_name: str) -> list[str]:
    """`local` first, then the requested (default: every available) kernels for this device."""
    if requested is None:
        wanted = ["sdpa"]
        if device_name == "cuda" and accel.installed("transformer_engine"):
            wanted.append("te")
        if device_name == "npu":
            wanted.append("torch_npu")
    else:
        wanted = [k.strip() for k in requested.split(",") if k.strip()]
    chosen = ["local"]
    for k in wanted:
        k = resolve_kernels(k, device_name)
        if k == "mindspeed":
            raise ConfigError(
                "--kernels: MindSpeed patches megatron for the whole process, local included; "
                "benchmark kernels=mindspeed with mtrain's training commands instead"
            )
        if k not in chosen:
            chosen.append(k)
    return chosen


def model_spec(a: argparse.Namespace) -> ModelSpec:
    return ModelSpec(
        family="qwen3",
        num_layers=a.layers,
        hidden_size=a.hidden,
        ffn_hidden_size=a.ffn,
        num_attention_heads=a.heads,
        num_query_groups=a.kv_heads,
        kv_channels=a.head_dim,
        vocab_size=a.vocab,
        max_position_embeddings=a.seq,
        rope_theta=1e6,
        norm_epsilon=1e-6,
        tie_word_embeddings=a.tie_embeddings,
    ).validate("bench/kernels.py")


def make_batch(a: argparse.Namespace) -> dict[str, torch.Tensor]:
    """One fixed batch on the CPU: causal rows, or packed rows with their cu_seqlens."""
    rng = np.random.default_rng(0)
    if not a.packed:
        tokens = torch.from_numpy(rng.integers(0, a.vocab, (a.batch, a.seq + 1)))
        return {
            "tokens": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(a.batch, a.seq),
            "position_ids": torch.arange(a.seq).expand(a.batch, a.seq).contiguous(),
        }
    rows = []
    for _ in range(a.batch):
        cuts = np.sort(rng.choice(np.arange(1, a.seq), a.segments - 1, replace=False))
        lengths = np.diff(np.concatenate([[0], cuts, [a.seq]]))
        samples = [(rng.integers(0, a.vocab, n), np.ones(n, dtype=np.int64)) for n in lengths]
        rows.append(sequence(samples, a.seq, pad_id=0, cu_len=a.segments + 1))
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def build(spec: ModelSpec, kernels: str, a: argparse.Namespace):
    """The model chunk for `kernels`, and whether it takes packed rows' masks as cu_seqlens."""
    from megatron.core import tensor_parallel

    from mtrain.models.provider import BuildOptions, build_model_chunks

    opts = BuildOptions(
        precision=a.precision,
        kernels=kernels,
        npu=NpuConfig(),
        explicit_attention_mask=a.packed,
        seed_init_on_cpu=True,
    )
    check(kernels, opts.npu, sequence_parallel=False)
    torch.manual_seed(SEED)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    (model,) = build_model_chunks(spec, opts)
    return model, opts.cu_seqlens_masks


# --- the variants -----------------------------------------------------------------------------


@dataclass
class Variant:
    kernels: str
    model: torch.nn.Module
    mask: torch.Tensor | None  # packed rows: the attention mask these kernels take
    init_diff: float = 0.0  # max |weight - local's| as built from the same seed
    logits_diff: float = 0.0  # max |logits - local's| on the fixed batch
    times: list[float] = field(default_factory=list)  # timed steps, seconds
    step_bytes: int = 0  # most device memory one step allocated on top of what was there

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def build_all(
    choices: list[str], spec: ModelSpec, b: dict[str, torch.Tensor], a: argparse.Namespace
) -> list[Variant]:
    """Every variant on the device, with local's weights, checked against local's logits."""
    dev = accel.device()
    variants: list[Variant] = []
    weights, reference = None, None
    for kernels in choices:
        model, cu_seqlens_masks = build(spec, kernels, a)
        mask = None
        if a.packed:
            cu = b["cu_seqlens"]
            mask = cu if cu_seqlens_masks else block_causal_mask(cu, a.seq)
        v = Variant(kernels, model, mask)
        if weights is None:
            # megatron's linear layers keep an `_extra_state` of None (FP8 metadata without FP8)
            weights = {
                n: w.clone() if torch.is_tensor(w) else w for n, w in model.state_dict().items()
            }
        else:  # did the same seed and init path give local's weights? Run on them regardless.
            mine = model.state_dict()
            v.init_diff = max(
                (mine[n].float() - w.float()).abs().max().item()
                for n, w in weights.items()
                if torch.is_tensor(w) and w.is_floating_point()
            )
            model.load_state_dict(weights)
        model.to(dev).eval()
        with torch.no_grad():
            logits = model(b["tokens"], b["position_ids"], attention_mask=mask)
            logits = logits[..., : spec.vocab_size]
            if reference is None:
                reference = logits.cpu()  # off the device: it would count in others' memory
            else:
                v.logits_diff = max(
                    (logits[r].float() - reference[r].to(dev).float()).abs().max().item()
                    for r in range(len(logits))
                )
        del logits
        model.train()
        variants.append(v)
    return variants


def train_step(v: Variant, b: dict[str, torch.Tensor]) -> float:
    """Forward and backward of the per-token loss; seconds. Leaves no gradients behind, so that
    the next variant's step starts from the same resident memory."""
    mem = memory_module()
    synchronize()
    if mem is not None:
        mem.reset_peak_memory_stats()
        before = mem.memory_allocated()
    start = time.perf_counter()
    loss = v.model(b["tokens"], b["position_ids"], attention_mask=v.mask, labels=b["labels"])
    (loss * b["loss_mask"]).sum().backward()
    synchronize()
    elapsed = time.perf_counter() - start
    if mem is not None:
        v.step_bytes = max(v.step_bytes, mem.max_memory_allocated() - before)
    del loss
    v.model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "npu"])
    parser.add_argument("--kernels", help="comma list; default: all available. local always runs")
    parser.add_argument("--packed", action="store_true", help="rows of several samples each")
    parser.add_argument("--segments", type=int, default=4, help="samples per packed row")
    parser.add_argument("--tie-embeddings", action="store_true")
    for name in DEFAULTS["cpu"]:
        kind = str if name == "precision" else int
        flag = "--" + name.replace("_", "-")
        extra = {"choices": ["fp32", "bf16"]} if name == "precision" else {}
        cpu, acc = DEFAULTS["cpu"][name], DEFAULTS["accelerator"][name]
        parser.add_argument(flag, type=kind, help=f"default: {cpu} on CPU, else {acc}", **extra)
    a = parser.parse_args()

    try:
        device_name = accel.resolve(a.device)
        choices = kernel_choices(a.kernels, device_name)
    except ConfigError as err:
        parser.error(str(err))
    for name, value in DEFAULTS["cpu" if device_name == "cpu" else "accelerator"].items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    if a.packed and not 1 <= a.segments <= a.seq:
        parser.error(f"--segments={a.segments} must be in [1, --seq={a.seq}]")
    spec = model_spec(a)

    accel.activate(device_name)
    parallel.init(1, 1)
    info = accel.current().describe()
    print(
        f"device {device_name} ({info.get('gpu') or info.get('npu') or 'host'}), "
        f"{spec.num_parameters() / 1e6:.0f} M parameters: {a.layers} layers, hidden {a.hidden}, "
        f"heads {a.heads}/{a.kv_heads} x {a.head_dim}, ffn {a.ffn}, vocab {a.vocab}; "
        f"{a.precision}, batch {a.batch} x seq {a.seq}"
        + (f", packed ({a.segments} samples a row)" if a.packed else "")
        + f"; median of {a.steps} steps after {a.warmup} warm-up",
        flush=True,
    )

    b = {k: v.to(accel.device()) for k, v in make_batch(a).items()}
    variants = build_all(choices, spec, b, a)
    for v in variants:
        for _ in range(a.warmup):
            train_step(v, b)
    # Round by round, one step of each (order rotating), so that a slow spell of the machine
    # falls on every variant alike.
    for i in range(a.steps):
        for v in variants[i % len(variants) :] + variants[: i % len(variants)]:
            v.times.append(train_step(v, b))

    tokens = a.batch * a.seq
    local = statistics.median(variants[0].times)
    print(
        f"\n{'kernels':<10} {'ms/step':>9} {'tokens/s':>10} {'vs local':>9} {'peak GiB':>9} "
        f"{'max|logits-local|':>18}"
    )
    for v in variants:
        step = statistics.median(v.times)
        peak = "n/a" if memory_module() is None else f"{(v.param_bytes() + v.step_bytes) / GiB:.2f}"
        diff = "0" if v.logits_diff == 0 else f"{v.logits_diff:.1e}"
        print(
            f"{v.kernels:<10} {step * 1e3:>9.1f} {tokens / step:>10.0f} {local / step:>9.2f} "
            f"{peak:>9} {diff:>18}"
        )
    differ = [f"{v.kernels} ({v.init_diff:.1e})" for v in variants[1:] if v.init_diff]
    if differ:
        print(
            "\nnote: the same seed did not build local's weights for "
            + ", ".join(differ)
            + "; they ran on local's weights, loaded after building"
        )
    parallel.shutdown()


if __name__ == "__main__":
    main()
