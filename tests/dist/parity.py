"""Worker: several converted checkpoints' logits vs the HF model, in one set of CPU processes.

    torchrun --nproc_per_node 4 tests/dist/parity.py RESULT.json HF_DIR CKPT [CKPT ...]

Each checkpoint runs at its own layout; processes beyond TP*PP are data parallel.
"""

import json
import sys

import torch

from mtrain import accel, parallel
from mtrain.verify import checkpoint_max_diff, hf_logits, random_tokens


def main() -> None:
    result_path, hf_dir, *ckpts = sys.argv[1:]
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(hf_dir).vocab_size
    tokens = random_tokens(vocab, batch=2, seq_length=24, seed=0)
    reference = hf_logits(hf_dir, tokens)  # before the CPU shim, on every rank
    accel.activate("cpu")
    parallel.init_process_group()
    results = {ckpt: checkpoint_max_diff(ckpt, tokens, reference) for ckpt in ckpts}
    if torch.distributed.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
