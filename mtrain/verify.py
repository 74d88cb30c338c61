"""`torchrun ... -m mtrain.verify hf_dir=HF ckpt_dir=CKPT`: does a Megatron checkpoint reproduce
the HF model's logits? (For LoRA adapters: the merged export's, or the base's with the PEFT
adapter: `hf_dir=HF_BASE peft_dir=ADAPTER`.)

Run it after a conversion, at the checkpoint's own TP/PP layout (any multiple of TP*PP processes).
The HF reference is computed once, on rank 0 and on the CPU, before the device backend is set up
(the CPU shim must not touch the transformers model), then broadcast to every rank.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING

from mtrain import accel, parallel
from mtrain.checkpoint import MegatronCheckpoint, load_model_weights
from mtrain.cli import hydra_command
from mtrain.errors import MtrainError
from mtrain.lora import add_adapters
from mtrain.losses import gather_vocab, logits_forward
from mtrain.models.provider import BuildOptions, build_model_chunks
from mtrain.schedule import run_schedule

log = logging.getLogger("mtrain.verify")


@dataclass
class VerifyConfig:
    hf_dir: str = MISSING  # the HF model the checkpoint was converted from
    peft_dir: str | None = None  # a PEFT adapter to apply on hf_dir (LoRA exported unmerged)
    ckpt_dir: str = MISSING  # the Megatron checkpoint to check
    base_dir: str | None = None  # for LoRA adapters: their base checkpoint, if not the recorded one
    device: str = "auto"  # auto | cpu | cuda | npu
    batch: int = 2  # sequences of random tokens to compare on
    seq_length: int = 32  # tokens per sequence
    seed: int = 0  # seed of the random tokens
    tolerance: float = 1e-5  # max |logit difference| allowed (fp32 weights)
    result_file: str | None = None  # also write {"max_abs_diff": ...} as JSON here


def random_tokens(vocab: int, batch: int, seq_length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_length), generator=generator)


def hf_logits(hf_dir: str, tokens: torch.Tensor, peft_dir: str | None = None) -> torch.Tensor:
    """Logits of the HF model (with a PEFT adapter on top, if `peft_dir`), in fp32."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if peft_dir is not None:
        try:
            from peft import PeftModel
        except ImportError:
            raise MtrainError("peft_dir needs the peft package: pip install peft") from None
        model = PeftModel.from_pretrained(model, peft_dir)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def megatron_logits(
    chunks: list[torch.nn.Module], tokens: torch.Tensor, vocab: int
) -> torch.Tensor | None:
    """Full-vocabulary logits on the last pipeline stage (None on the others)."""
    captured: list[torch.Tensor] = []

    def keep(batch, logits):
        captured.append(logits.detach())
        return logits.new_zeros(()), {}

    for chunk in chunks:
        chunk.eval()
    # One sequence per micro-batch: the interleaved schedule needs at least PP micro-batches.
    positions = torch.arange(tokens.shape[1]).expand(1, -1)
    rows = [{"tokens": row, "position_ids": positions} for row in tokens.split(1)]
    with torch.no_grad():
        run_schedule(
            chunks,
            [iter(rows) for _ in chunks],
            logits_forward,
            keep,
            len(rows),
            tokens.shape[1],
            1,
            forward_only=True,
        )
    if not parallel.is_last_stage():
        return None
    return gather_vocab(torch.cat(captured))[..., :vocab].float()


def checkpoint_max_diff(
    ckpt_dir: str | Path,
    tokens: torch.Tensor,
    reference: torch.Tensor,
    base_dir: str | Path | None = None,
) -> float:
    """Max |logits - reference| of a checkpoint at its own layout, known on every rank. An
    adapter (LoRA) checkpoint runs on its base (`base_dir`, default the recorded one)."""
    ckpt = MegatronCheckpoint.open(Path(ckpt_dir))
    parallel.init(ckpt.tp, ckpt.pp, ckpt.vpp, ep=ckpt.ep)
    try:
        opts = BuildOptions(tp=ckpt.tp, pp=ckpt.pp, vpp=ckpt.vpp, ep=ckpt.ep, initialize=False)
        chunks = build_model_chunks(ckpt.spec, opts)
        chunks = [c.to(accel.device()) for c in chunks]
        if ckpt.lora is not None:
            add_adapters(chunks, ckpt.lora.config, seed=0)  # values come from the checkpoint
        load_model_weights(
            chunks, ckpt_dir, ckpt.spec, ckpt.tp, ckpt.pp, ckpt.vpp, base_dir=base_dir, ep=ckpt.ep
        )
        logits = megatron_logits(chunks, tokens.to(accel.device()), ckpt.spec.vocab_size)
        diff = torch.tensor([-1.0], device=accel.device())
        if logits is not None:
            diff[0] = (logits.cpu() - reference).abs().max()
        torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
        return diff.item()
    finally:
        parallel.destroy()


@hydra_command("verify", VerifyConfig)
def main(cfg: VerifyConfig) -> None:
    ckpt = MegatronCheckpoint.open(Path(cfg.ckpt_dir))
    tokens = random_tokens(ckpt.spec.vocab_size, cfg.batch, cfg.seq_length, cfg.seed)
    # Rank 0 alone loads the HF model, before the backend's set-up touches torch.
    box = [hf_logits(cfg.hf_dir, tokens, cfg.peft_dir) if parallel.global_rank() == 0 else None]
    accel.activate(cfg.device)
    parallel.init_process_group()
    torch.distributed.broadcast_object_list(box, src=0)
    diff = checkpoint_max_diff(cfg.ckpt_dir, tokens, box[0], cfg.base_dir)
    ok = diff <= cfg.tolerance
    log.info(
        "verify: %s at tp=%d pp=%d ep=%d: max |logits - HF| = %.3g (tolerance %.0e) -> %s",
        cfg.ckpt_dir,
        ckpt.tp,
        ckpt.pp,
        ckpt.ep,
        diff,
        cfg.tolerance,
        "OK" if ok else "MISMATCH",
    )
    if cfg.result_file and torch.distributed.get_rank() == 0:
        Path(cfg.result_file).write_text(json.dumps({"max_abs_diff": diff, "ok": ok}) + "\n")
    parallel.shutdown()
    if not ok:
        hint = ""
        if ckpt.lora is not None and cfg.peft_dir is None:
            hint = (
                "; a merged export of adapters on bf16/fp16 weights is rounded to that dtype: "
                "check the PEFT export (peft_dir=) or raise tolerance="
            )
        raise MtrainError(
            f"{cfg.ckpt_dir}: logits differ from {cfg.hf_dir} by {diff:.3g} "
            f"> tolerance {cfg.tolerance:g}{hint}"
        )


if __name__ == "__main__":
    main()
