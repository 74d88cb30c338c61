"""Shared fixtures: tiny HF models built on the spot (nothing is downloaded)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mtrain.models.spec import ModelSpec

TINY = ModelSpec(
    family="qwen3", num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
    num_query_groups=2, kv_channels=32, vocab_size=512, max_position_embeddings=512,
    rope_theta=1e6, norm_epsilon=1e-6, tie_word_embeddings=True,
)  # fmt: skip


def tiny_spec(**changes) -> ModelSpec:
    return replace(TINY, **changes)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """`tiny_hf(spec, dtype=..., shard=...)` -> directory of a saved random HF model (cached)."""
    from mtrain.models.tiny import build_model

    cache: dict[tuple, Path] = {}

    def make(
        spec: ModelSpec = TINY, dtype: torch.dtype = torch.float32, shard: str | None = "40KB"
    ) -> Path:
        key = (tuple(vars(spec).items()), dtype, shard)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"hf_{spec.family}")
            build_model(out, spec, seed=len(cache), dtype=dtype, max_shard_size=shard)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    """A tiny HF tokenizer (byte-level BPE, ChatML specials and template) in a directory."""
    from mtrain.models.tiny import build_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="session")
def spaced_tok_dir(tok, tmp_path_factory) -> Path:
    """The tiny tokenizer with a template whose assistant header ends in a space, which BPE
    merges into a response starting with a word: such a turn's boundary falls inside a token."""
    spaced = tok.__class__.from_pretrained(tok.name_or_path)
    spaced.chat_template = (
        "{% for m in messages %}{{ m.role + ': ' + m.content + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    out = tmp_path_factory.mktemp("tok_spaced")
    spaced.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def cache_contents():
    """`cache_contents(dir)`: every file of the cache entries in `dir`, by name; the .json
    without the time the tokenization took, the one thing that differs between two runs."""

    def contents(cache_dir: Path) -> dict[str, bytes]:
        out = {}
        for f in sorted(p for p in cache_dir.iterdir() if p.is_file()):
            data = f.read_bytes()
            if f.suffix == ".json":
                meta = json.loads(data)
                meta.pop("seconds")
                data = json.dumps(meta, sort_keys=True).encode()
            out[f.name] = data
        return out

    return contents
