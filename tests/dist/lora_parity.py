"""Worker: a LoRA checkpoint's logits in megatron-core vs its two HF exports.

    torchrun --nproc_per_node 4 tests/dist/lora_parity.py RESULT.json CKPT BASE_HF MERGED_HF PEFT_DIR

Writes max |logits - reference| for the merged model and for the base + PEFT adapter, and how far
the adapters move the base model's logits (so a test can tell they matter).
"""

import json
import sys

import torch

from mtrain import accel, parallel
from mtrain.verify import checkpoint_max_diff, hf_logits, random_tokens


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
        "adapter_effect": (merged - base).abs().max().item(),
    }
    if torch.distributed.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
