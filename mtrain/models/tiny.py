"""Tiny HF models and a tiny tokenizer, built locally with no download.

The quickstart, the tests and the benchmarks need a real HF checkpoint and tokenizer but cannot
fetch one from a hub, so they build them: a byte-level BPE tokenizer trained on text written
here, with Qwen's ChatML special tokens and chat template, and a randomly initialised
transformers model of any supported family.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING

from mtrain.checkpoint.atomic import atomic_output_dir, atomic_paths
from mtrain.cli import hydra_command
from mtrain.dtypes import parse_dtype
from mtrain.models.spec import ModelSpec, hf_config_from_spec

log = logging.getLogger("mtrain.tiny")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen-style ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = (
    "the a model train token layer data fast exact small large parallel tensor pipeline sequence "
    "learn rate loss step batch shard merge convert check save load quick brown fox jumps over "
    "lazy dog one two three four five six seven eight nine ten reverse string answer question "
    "user assistant system hello world npu gpu cpu rank node cluster"
).split()


def corpus(lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English text with letters, digits and punctuation."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 9999)))
        out.append(" ".join(words) + rng.choice([".", "?", "!", ","]))
    return out


def write_corpus(path: str | Path, lines: int, seed: int = 0) -> None:
    """`corpus()` as JSONL records with a `text` field, written all-or-nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(path) as (temp,), open(temp, "w") as f:
        for line in corpus(lines, seed):
            f.write(json.dumps({"text": line}) + "\n")


def _write_jsonl(path: str | Path, rows) -> None:
    """Write JSON lines all-or-nothing (a temporary name, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(path) as (temp,), open(temp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _strings(letters: str, length: int) -> list[str]:
    import itertools

    return ["".join(chars) for chars in itertools.product(letters, repeat=length)]


def write_chat_task(path: str | Path, letters: str = "abcd", length: int = 2) -> None:
    """Every string of `length` over `letters` and its reversal, as OpenAI-style conversations
    (`{"messages": [user, assistant]}`): a task a tiny model can learn."""
    _write_jsonl(
        path,
        (
            {
                "messages": [
                    {"role": "user", "content": f"reverse: {s}"},
                    {"role": "assistant", "content": s[::-1]},
                ]
            }
            for s in _strings(letters, length)
        ),
    )


def write_preference_task(path: str | Path, letters: str = "abcd", length: int = 2) -> None:
    """Preference pairs for the reversal task (`{"prompt", "chosen", "rejected"}`, OpenAI-style
    strings): chosen is the reversal, rejected the string unchanged (palindromes skipped)."""
    _write_jsonl(
        path,
        (
            {"prompt": f"reverse: {s}", "chosen": s[::-1], "rejected": s}
            for s in _strings(letters, length)
            if s != s[::-1]
        ),
    )


def write_kto_task(path: str | Path, letters: str = "abcd", length: int = 2) -> None:
    """The preference pairs split into KTO's unpaired samples (`{"prompt", "completion",
    "label"}`): the reversal is desirable, the unchanged string not."""
    rows = []
    for s in _strings(letters, length):
        if s != s[::-1]:
            rows.append({"prompt": f"reverse: {s}", "completion": s[::-1], "label": True})
            rows.append({"prompt": f"reverse: {s}", "completion": s, "label": False})
    _write_jsonl(path, rows)


def write_reward_task(path: str | Path, seed: int = 0, letters: str = "abcd", length: int = 3):
    """Pairs a reward model can learn from and generalise: every string of `length` over
    `letters` as the prompt; chosen is a shuffle of it with the marker letter `z` put in at a
    seeded place, rejected the same shuffle without it."""
    import random

    rng = random.Random(seed)
    rows = []
    for s in _strings(letters, length):
        answer = "".join(rng.sample(s, len(s)))
        at = rng.randrange(len(answer) + 1)
        chosen = answer[:at] + "z" + answer[at:]
        rows.append({"prompt": f"rate: {s}", "chosen": chosen, "rejected": answer})
    _write_jsonl(path, rows)


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer and save it as an HF fast tokenizer in `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(
    out_dir: str | Path,
    spec: ModelSpec,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    tokenizer: bool = True,
):
    """Save a random-weight HF model of `spec` (plus the tiny tokenizer) into `out_dir`.

    Norm weights are randomised too, so a converter that drops or swaps them cannot pass a
    parity test by luck; so are MoE routers (transformers starts them at zero), wide enough that
    each token's top-k choice is clear-cut rather than decided by rounding.
    """
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    out_dir = Path(out_dir)
    raw = hf_config_from_spec(spec, dtype=str(dtype).removeprefix("torch."))
    model_type = raw.pop("model_type")
    config = CONFIG_MAPPING[model_type](**raw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.02)
            elif name.endswith("mlp.gate.weight") and spec.is_moe:
                param.normal_(0.0, 0.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out_dir), **kwargs)
    if tokenizer:
        build_tokenizer(out_dir, vocab_size=min(spec.vocab_size, 512))
    return model


@dataclass
class TinyConfig:
    out_dir: str = MISSING  # where the HF model directory is written
    preset: str = "qwen3_tiny"  # a conf/model preset; keep it small, weights are random
    seed: int = 0  # seed of the random weights and the sample data
    dtype: str = "fp32"  # bf16 | fp16 | fp32
    force: bool = False  # replace a non-empty out_dir
    corpus_file: str | None = None  # also write a synthetic JSONL text corpus here (sample data)
    corpus_lines: int = 2000  # documents in that corpus
    chat_file: str | None = None  # also write a small SFT task here (OpenAI messages JSONL)
    pairs_file: str | None = None  # also write the task's preference pairs here (DPO, JSONL)
    kto_file: str | None = None  # also write them as unpaired labelled samples here (KTO, JSONL)


@hydra_command("tiny", TinyConfig)
def main(cfg: TinyConfig) -> None:
    """`python -m mtrain.models.tiny out_dir=DIR`: a random tiny HF model + tokenizer."""
    from mtrain.config.model import load_preset

    spec = load_preset(cfg.preset).spec()
    dtype = parse_dtype(cfg.dtype)
    with atomic_output_dir(Path(cfg.out_dir), cfg.force, []) as temp:
        build_model(temp, spec, seed=cfg.seed, dtype=dtype)
    log.info(
        "tiny: %s model (%.2fM parameters) + tokenizer -> %s",
        cfg.preset,
        spec.num_parameters() / 1e6,
        cfg.out_dir,
    )
    if cfg.chat_file:
        write_chat_task(cfg.chat_file)
        log.info("tiny: string-reversal SFT task -> %s", cfg.chat_file)
    if cfg.pairs_file:
        write_preference_task(cfg.pairs_file)
        log.info("tiny: string-reversal preference pairs -> %s", cfg.pairs_file)
    if cfg.kto_file:
        write_kto_task(cfg.kto_file)
        log.info("tiny: string-reversal KTO samples -> %s", cfg.kto_file)
    if cfg.corpus_file:
        write_corpus(cfg.corpus_file, cfg.corpus_lines, cfg.seed)
        log.info("tiny: %d-document JSONL corpus -> %s", cfg.corpus_lines, cfg.corpus_file)


if __name__ == "__main__":
    main()
