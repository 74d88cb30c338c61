"""Worker: a LoRA checkpoint's logits in megatron-core vs its two HF exports.

    torchrun --nproc_per_node 4 tests/dist/lora_parity.py RESULT.json CKPT BASE_HF MERGED_HF PEFT_DIR

Writes max |logits - reference| for the merged model, for the base + PEFT adapter, and for the
megatron model with its adapters disabled against the base; and how far the adapters move the
base model's logits (so a test can tell they matter).
"""

import json
import sys

import torch

from mtrain import accel, parallel
from mtrain.checkpoint import MegatronCheckpoint, load_model_weights
from mtrain.lora import adapters_disabled, add_adapters
from mtrain.models.provider import BuildOptions, build_model_chunks
from mtrain.verify import checkpoint_max_diff, hf_logits, megatron_logits, random_tokens


def disabled_max_diff(ckpt_dir: str, tokens: torch.Tensor, base: torch.Tensor) -> float:
    ckpt = MegatronCheckpoint.open(ckpt_dir)
    parallel.init(ckpt.tp, ckpt.pp)
    chunks = build_model_chunks(ckpt.spec, BuildOptions(tp=ckpt.tp, pp=ckpt.pp))
    add_adapters(chunks, ckpt.lora.config, seed=0)
    load_model_weights(chunks, ckpt_dir, ckpt.spec, ckpt.tp, ckpt.pp)
    with adapters_disabled(chunks):
        logits = megatron_logits(chunks, tokens, ckpt.spec.vocab_size)
    diff = torch.tensor([-1.0])
    if logits is not None:
        diff[0] = (logits - base).abs().max()
    torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    parallel.destroy()
    return diff.item()


def main() -> None:
    result_path, ckpt, base_hf, merged_hf, peft_dir = sys.argv[1:]
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(base_hf).vocab_size
    tokens = random_tokens(vocab, batch=2, seq_length=24, seed=0)
    merged = hf_logits(merged_hf, tokens)  # before the CPU shim, on every rank
    with_peft = hf_logits(base_hf, tokens, peft_dir)
    base = hf_logits(base_hf, tokens)
    accel.activate("cpu")
    parallel.init_process_group()
    results = {
        "merged": checkpoint_max_diff(ckpt, tokens, merged),
        "peft": checkpoint_max_diff(ckpt, tokens, with_peft),
        "disabled_vs_base": disabled_max_diff(ckpt, tokens, base),
        "adapter_effect": (merged - base).abs().max().item(),
    }
    if torch.distributed.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
