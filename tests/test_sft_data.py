"""SFT data: record formats -> conversations -> templates -> loss masks -> packed sequences.

References are independent of the code under test: the tokenizer's own `apply_chat_template`,
token ids of the template's pieces tokenized one by one, strings written by hand from the
models' published chat formats, Qwen3's published Jinja template (its non-tool part), and
plain loops for the attention mask.
"""

from __future__ import annotations

import json
import logging
import operator
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mtrain.config.sft_data import SFTDataConfig
from mtrain.data import pool, progress, sft_cache, sft_encode
from mtrain.data.masking import ChatEncoder
from mtrain.data.packing import best_fit_decreasing
from mtrain.data.sampler import collate
from mtrain.data.sft import (
    block_causal_mask,
    build_sft_datasets,
    load_conversations,
    tokenize_conversation,
)
from mtrain.data.templates import resolve_template
from mtrain.errors import ConfigError, DataError
from mtrain.models.tiny import corpus as sentences

SYSTEM, Q1, A1, Q2, A2 = (
    "You are terse.", "hello there", "the quick brown fox", "one more", "lazy dog jumps",
)  # fmt: skip
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": Q1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": Q2},
    {"role": "assistant", "content": A2},
]
RECORDS = {  # the same conversation in every layout
    "alpaca": {
        "system": SYSTEM, "history": [[Q1, A1]], "instruction": Q2, "input": "", "output": A2,
    },
    "sharegpt": {
        "system": SYSTEM,
        "conversations": [
            {"from": "human", "value": Q1}, {"from": "gpt", "value": A1},
            {"from": "human", "value": Q2}, {"from": "gpt", "value": A2},
        ],
    },
    "openai": {"messages": CONVERSATION},
}  # fmt: skip

# The non-tool part of Qwen3's published chat template (tokenizer_config.json of Qwen/Qwen3-*).
QWEN3_JINJA = """\
{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}
{%- if ns.multi_step_tool and message.role == "user" %}{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}
{%- endfor %}
{%- for message in messages %}{%- set content = message.content %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
{%- elif message.role == "assistant" %}{%- set reasoning_content = '' %}
{%- if '</think>' in content %}{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
{%- if loop.index0 > ns.last_query_index %}
{%- if loop.last or (not loop.last and reasoning_content) %}{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}
{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"""

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def llama_tok(tok_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tok_dir))
    t.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    return t


def cfg(**kw) -> SFTDataConfig:
    return SFTDataConfig(path=kw.pop("path", "unused.jsonl"), **kw)


def write(path: Path, records: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=5)
    return path


def random_conversations(n: int, seed: int = 0, skew: bool = False) -> list[list[dict]]:
    """Multi-turn conversations; with `skew`, mostly short with a long tail."""
    rng = random.Random(seed)
    lines = sentences(lines=4000, seed=seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(lines) for _ in range(k))

    out = []
    for _ in range(n):
        conv = [{"role": "system", "content": text(1)}] if rng.random() < 0.5 else []
        for _ in range(rng.choice([1, 1, 2, 3])):
            size = int(rng.paretovariate(1.2)) if skew else rng.randint(1, 6)
            conv += [
                {"role": "user", "content": text(rng.randint(1, 3))},
                {"role": "assistant", "content": text(min(size, 60))},
            ]
        out.append(conv)
    return out


def chatml_reference(tok, messages, trained) -> tuple[list[int], list[int]]:
    """(ids, labels) from ChatML's pieces tokenized one by one; `trained(k)`: is message k's
    assistant turn trained."""
    ids, labels = [], []

    def add(text: str, train: bool):
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if train else [-100] * len(piece))

    for k, m in enumerate(messages):
        add(f"<|im_start|>{m['role']}\n", trained(k) == "all")
        if m["role"] == "assistant" and trained(k):
            add(m["content"] + "<|im_end|>", True)
            add("\n", trained(k) == "all")
        else:
            add(m["content"] + "<|im_end|>\n", trained(k) == "all")
    return ids, labels


# --- formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "openai"])
def test_every_format_and_file_type_gives_the_same_conversation(tmp_path, fmt, suffix):
    path = write(tmp_path / f"d{suffix}", [RECORDS[fmt]] * 3)
    assert load_conversations(cfg(), path) == [CONVERSATION] * 3
    assert load_conversations(cfg(format=fmt), [str(path)]) == [CONVERSATION] * 3


def test_alpaca_input_is_appended_to_the_instruction(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"instruction": "Sum", "input": "1 2", "output": "3"}])
    assert load_conversations(cfg(), path) == [
        [{"role": "user", "content": "Sum\n1 2"}, {"role": "assistant", "content": "3"}]
    ]


def test_columns_rename_fields(tmp_path):
    alpaca = write(tmp_path / "a.jsonl", [{"prompt": "q", "response": "a"}])
    got = load_conversations(cfg(columns={"instruction": "prompt", "output": "response"}), alpaca)
    assert got == [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    turns = [{"speaker": "user", "text": "q"}, {"speaker": "assistant", "text": "a"}]
    chat = write(tmp_path / "c.jsonl", [{"dialog": turns}])
    renames = {"messages": "dialog", "role": "speaker", "content": "text"}
    for fmt in ("auto", "openai", "sharegpt"):
        assert load_conversations(cfg(format=fmt, columns=renames), chat) == got


def test_openai_text_parts_are_joined(tmp_path):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": "c"}]
    path = write(tmp_path / "d.jsonl", [{"messages": messages}])  # fmt: skip
    assert load_conversations(cfg(), path)[0][0] == {"role": "user", "content": "ab"}


BAD = [  # (layout of the file, bad record, error)
    ("openai", "{not json", "not valid JSON"),
    ("openai", '{"messages": [{"role": "user", "content": "q"}]}', "ends with a user turn"),
    ("openai", '{"messages": [{"role": "narrator", "content": "q"}]}', "has role 'narrator'"),
    ("openai", '{"messages": "hi"}', "must be a list of messages"),
    ("openai", '{"text": "q"}', "field 'messages' must be a list of messages, got missing"),
    ("alpaca", '{"instruction": "q"}', "no field 'output'"),
    ("sharegpt", '{"conversations": [{"from": "gpt", "value": "a"}]}', "starts with a assistant"),
]


@pytest.mark.parametrize("fmt, line, message", BAD, ids=[m[:20] for _, _, m in BAD])
def test_malformed_record_names_file_and_line(tmp_path, fmt, line, message):
    good = json.dumps(RECORDS[fmt])
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError, match=rf"train\.jsonl:4: .*{message}"):
        load_conversations(cfg(format="auto"), path)


def test_unrecognised_layout_is_named(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": "q"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: cannot tell the record format.*'text'"):
        load_conversations(cfg(), path)


def test_malformed_record_in_json_and_parquet_is_located(tmp_path):
    records = [RECORDS["alpaca"], RECORDS["alpaca"], {"instruction": "q"}]
    path = write(tmp_path / "d.json", records)
    line = path.read_text().splitlines().index(" {", 20) + 1  # where the third record starts
    with pytest.raises(DataError, match=rf"d\.json:{line}: no field 'output'"):
        load_conversations(cfg(), path)
    path = write(tmp_path / "d.parquet", records)
    with pytest.raises(DataError, match=r"d\.parquet: row 3: no field 'output'"):
        load_conversations(cfg(), path)


def test_skip_bad_counts_and_reports_in_one_line(tmp_path, tok_dir, caplog):
    lines = [json.dumps(RECORDS["sharegpt"])] * 5
    lines[1], lines[3] = "{oops", '{"conversations": []}'
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO, logger="mtrain.data"):
        assert len(load_conversations(cfg(skip_bad=True), path)) == 3
        train, _ = build_sft_datasets(
            cfg(path=str(path), skip_bad=True, cache_dir=str(tmp_path / "c")), str(tok_dir), 64, 0
        )
    assert train.stats["samples"] == 3
    reports = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(reports) == 2  # load_conversations, then the tokenization of the file
    assert all("skipped 2 malformed record(s)" in r and "train.jsonl:2:" in r for r in reports)


# --- templates ------------------------------------------------------------------------------------

TWO_TURNS = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "<think>\nplan it\n</think>\n\nhello"},
    {"role": "user", "content": "more"},
    {"role": "assistant", "content": "bye"},
]
IM = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
EXPECTED = {
    ("qwen3", "on"): IM + "<|im_start|>assistant\n<think>\nplan it\n</think>\n\nhello<|im_end|>\n"
    "<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nbye<|im_end|>\n",
    ("qwen3", "off"): IM + "<|im_start|>assistant\n<think>\n\n</think>\n\nhello<|im_end|>\n"
    "<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nbye<|im_end|>\n",
    ("qwen3", "keep"): IM + "<|im_start|>assistant\n<think>\nplan it\n</think>\n\nhello<|im_end|>\n"
    "<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\nbye<|im_end|>\n",
    ("qwen2_5", "on"): IM + "<|im_start|>assistant\n<think>\nplan it\n</think>\n\nhello<|im_end|>\n"
    "<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\nbye<|im_end|>\n",
    ("llama3", "on"): "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are "
    "terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>"
    "assistant<|end_header_id|>\n\n<think>\nplan it\n</think>\n\nhello<|eot_id|><|start_header_id|>"
    "user<|end_header_id|>\n\nmore<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nbye"
    "<|eot_id|>",
}  # fmt: skip
GENERATION_PROMPT = {
    ("qwen3", "on"): "<|im_start|>assistant\n",
    ("qwen3", "off"): "<|im_start|>assistant\n<think>\n\n</think>\n\n",
    ("qwen3", "keep"): "<|im_start|>assistant\n",
    ("qwen2_5", "on"): "<|im_start|>assistant\n",
    ("llama3", "on"): "<|start_header_id|>assistant<|end_header_id|>\n\n",
}


@pytest.mark.parametrize("name, thinking", list(EXPECTED), ids="-".join)
def test_builtin_templates_render_the_published_formats(llama_tok, name, thinking):
    template = resolve_template(name, llama_tok, thinking=thinking)
    assert template.render([TWO_TURNS], False) == [EXPECTED[name, thinking]]
    (prompt,) = template.render([TWO_TURNS[:4]], True)
    assert (
        prompt
        == EXPECTED[name, thinking].rsplit(GENERATION_PROMPT[name, thinking], 1)[0]
        + (GENERATION_PROMPT[name, thinking])
    )


def test_default_and_overridden_system_prompts(tok, llama_tok):
    convo = [{"role": "user", "content": " hi \n"}, {"role": "assistant", "content": "yo"}]
    qwen = resolve_template("qwen2_5", tok).render([convo], False)[0]
    assert qwen.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\n hi \n<|im_end|>"
    )
    qwen = resolve_template("qwen2_5", tok, system="Be brief.").render([TWO_TURNS], False)[0]
    assert qwen.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")
    llama = resolve_template("llama3", llama_tok, system="S").render([convo], False)[0]
    assert llama.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"  # Llama 3 trims content
    )
    assert resolve_template("qwen3", tok).render([convo], False)[0].startswith("<|im_start|>user")


@pytest.mark.parametrize(
    "answer", ["plain answer", "<think>\nsteps\n</think>\n\nanswer", "<think>x</think>answer"]
)
def test_qwen3_builtin_renders_a_turn_as_qwen3s_own_template(tok, answer):
    convo = [*TWO_TURNS[:2], {"role": "assistant", "content": answer}]
    theirs = tok.apply_chat_template(convo, chat_template=QWEN3_JINJA, tokenize=False)
    assert resolve_template("qwen3", tok, thinking="on").render([convo], False) == [theirs]
    no_think = tok.apply_chat_template(
        convo[:2], chat_template=QWEN3_JINJA, tokenize=False, add_generation_prompt=True,
        enable_thinking=False,
    )  # fmt: skip
    assert resolve_template("qwen3", tok, thinking="off").render([convo[:2]], True) == [no_think]


@pytest.mark.parametrize(
    "family, expected", [("qwen2", "qwen2_5"), ("qwen3", "qwen3"), (None, None)]
)
def test_auto_without_a_chat_template_picks_the_model_familys(tmp_path, tok_dir, family, expected):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(tok_dir))
    plain.chat_template = None
    plain.save_pretrained(str(tmp_path))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    if family:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": family}))
    plain = AutoTokenizer.from_pretrained(str(tmp_path))
    assert not plain.chat_template
    if expected is None:
        with pytest.raises(ConfigError, match="has no chat_template.*set data.template"):
            resolve_template("auto", plain)
    else:
        assert resolve_template("auto", plain).fmt.name == expected


def test_builtin_template_needs_its_special_tokens(tok):
    with pytest.raises(ConfigError, match=r"data.template=llama3 needs .*<\|eot_id\|>"):
        resolve_template("llama3", tok)


# --- tokenization and loss masks ------------------------------------------------------------------


@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "openai"])
def test_masks_are_exactly_the_assistant_spans(tmp_path, tok, fmt, train_on):
    (messages,) = load_conversations(cfg(), write(tmp_path / "d.jsonl", [RECORDS[fmt]]))
    last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")

    def trained(k):
        if train_on == "all":
            return "all"
        return messages[k]["role"] == "assistant" and (train_on == "assistant" or k == last)

    ids, labels = chatml_reference(tok, messages, trained)
    got = tokenize_conversation(messages, tok, cfg(train_on=train_on))
    assert got["input_ids"] == ids
    assert got["labels"] == labels
    trained_text = tok.decode([t for t in got["labels"] if t != -100])
    expected = {"assistant": A1 + "<|im_end|>" + A2 + "<|im_end|>", "last": A2 + "<|im_end|>"}
    assert trained_text == expected.get(train_on, tok.decode(ids))


def test_input_ids_equal_apply_chat_template(tok):
    for messages in random_conversations(40, seed=3):
        got = tokenize_conversation(messages, tok, cfg(template="tokenizer"))["input_ids"]
        assert got == tok.apply_chat_template(messages, tokenize=True, return_dict=False)


def test_qwen3_off_trains_the_answer_not_the_empty_think_block(tok):
    got = tokenize_conversation(TWO_TURNS, tok, cfg(template="qwen3", thinking="off"))
    trained = [t for t in got["labels"] if t != -100]
    assert tok.decode(trained) == "hello<|im_end|>bye<|im_end|>"
    got = tokenize_conversation(TWO_TURNS, tok, cfg(template="qwen3", thinking="on"))
    assert tok.decode([t for t in got["labels"] if t != -100]) == (
        "<think>\nplan it\n</think>\n\nhello<|im_end|><think>\n\n</think>\n\nbye<|im_end|>"
    )


def test_llama3_masks_content_and_eot(llama_tok):
    got = tokenize_conversation(TWO_TURNS[:3], llama_tok, cfg(template="llama3"))
    trained = llama_tok.decode([t for t in got["labels"] if t != -100])
    assert trained == "<think>\nplan it\n</think>\n\nhello<|eot_id|>"
    assert got["input_ids"][0] == llama_tok.convert_tokens_to_ids("<|begin_of_text|>")


def test_fast_boundaries_agree_with_tokenizing_every_prefix(tok):
    """The char->token shortcut must give what the incremental method gives by definition."""
    convs = random_conversations(60, seed=5)
    convs[0][-1]["content"] = "  leading spaces"
    convs[1][-1]["content"] = "\n\nleading newlines"
    convs[2][-1]["content"] = "naïve café 🙂 ünïcödé"
    template = resolve_template("tokenizer", tok)
    for train_on in ("assistant", "last"):
        fast = ChatEncoder(tok, template, train_on).encode(convs)
        exact = ChatEncoder(tok, template, train_on, exact=True).encode(convs)
        assert [(e.ids, e.spans) for e in fast] == [(e.ids, e.spans) for e in exact]
        for conv, e in zip(convs, exact):  # each trained span starts where a prompt's tokens end
            for a, _ in e.spans:
                assert any(
                    tok.apply_chat_template(conv[:k], add_generation_prompt=True, return_dict=False)
                    == e.ids[:a]
                    for k in range(1, len(conv))
                )


def test_template_that_rewrites_earlier_turns_is_refused(tok):
    qwen3 = cfg(template="tokenizer")
    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.chat_template = QWEN3_JINJA
    with pytest.raises(ConfigError, match="rewrites earlier turns.*data.train_on=last"):
        tokenize_conversation(TWO_TURNS, tok, qwen3)
    got = tokenize_conversation(TWO_TURNS, tok, cfg(template="tokenizer", train_on="last"))
    assert tok.decode([t for t in got["labels"] if t != -100]) == (
        "<think>\n\n</think>\n\nbye<|im_end|>"
    )
    assert got["input_ids"] == tok.apply_chat_template(TWO_TURNS, return_dict=False)


def test_turn_boundary_inside_a_token_is_a_bad_record(tmp_path, tok, tok_dir):
    """A header ending in a space that BPE merges into the answer's first word: the prompt's
    tokens are not a prefix of the conversation's, so the record cannot be masked faithfully."""
    spaced = tok.__class__.from_pretrained(str(tok_dir))
    spaced.chat_template = (
        "{% for m in messages %}{{ m.role + ': ' + m.content + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    convo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(DataError, match="conversation 1: a token spans the boundary before"):
        tokenize_conversation(convo, spaced, cfg(template="tokenizer"))
    dumped = tmp_path / "tok_spaced"
    spaced.save_pretrained(str(dumped))
    ok = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "!"}]
    path = write_conversations(tmp_path / "d.jsonl", [ok, convo, ok])
    config = cfg(path=str(path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"d\.jsonl:2: a token spans the boundary"):
        build_sft_datasets(config, str(dumped), 32, 0)
    config.skip_bad = True
    train, _ = build_sft_datasets(config, str(dumped), 32, 0)
    assert train.stats["samples"] == 2


# --- datasets, packing, truncation ----------------------------------------------------------------


def write_conversations(path: Path, convs: list[list[dict]]) -> Path:
    return write(path, [{"messages": c} for c in convs])


def unpack(item: dict) -> list[dict]:
    cu = item["cu_seqlens"].tolist()
    return [
        {k: item[k][a:b] for k in ("tokens", "labels", "position_ids")}
        for a, b in zip(cu, cu[1:])
        if b > a
    ]


@pytest.mark.parametrize("pack", [True, False])
def test_sequences_unpack_into_the_tokenized_samples(tmp_path, tok, tok_dir, pack):
    convs = random_conversations(80, seed=1, skew=True)
    path = write_conversations(tmp_path / "d.jsonl", convs)
    seq = 256
    config = cfg(path=str(path), packing=pack, cache_dir=str(tmp_path / "c"))
    train, val = build_sft_datasets(config, str(tok_dir), seq, seed=0)
    assert val is None
    expected = []
    for c in convs:
        s = tokenize_conversation(c, tok, config)
        if len(s["input_ids"]) > seq:
            s = {k: v[:seq] for k, v in s.items()}
        if any(t != -100 for t in s["labels"][1:]):
            expected.append((tuple(s["input_ids"]), tuple(s["labels"][1:] + [-100])))
    got = []
    for i in range(len(train)):
        item = train[i]
        assert all(v.shape[0] == seq for k, v in item.items() if k != "cu_seqlens")
        assert item["cu_seqlens"].dtype == torch.int32 and item["cu_seqlens"][-1] == seq
        segments = unpack(item)
        if not pack:
            assert len(segments) <= 2
        for n, segment in enumerate(segments):
            length = len(segment["tokens"])
            assert segment["position_ids"].tolist() == list(range(length))
            assert segment["labels"][-1] == -100  # no sample predicts the next one's first token
            is_padding = n == len(segments) - 1 and (segment["tokens"] == tok.pad_token_id).all()
            if not is_padding:
                got.append((tuple(segment["tokens"].tolist()), tuple(segment["labels"].tolist())))
        assert torch.equal(item["loss_mask"], (item["labels"] != -100).float())
    assert Counter(got) == Counter(expected)
    batch = collate([train[i] for i in range(min(4, len(train)))])  # one shape: they stack
    assert batch["tokens"].shape == (min(4, len(train)), seq)


def test_packing_waste_is_low_on_skewed_lengths(tmp_path, tok_dir):
    path = write_conversations(tmp_path / "d.jsonl", random_conversations(600, seed=2, skew=True))
    waste = {}
    for pack in (False, True):
        config = cfg(path=str(path), packing=pack, cache_dir=str(tmp_path / "c"))
        train, _ = build_sft_datasets(config, str(tok_dir), 1024, seed=0)
        waste[pack] = train.stats["padding"]
    assert waste[True] <= 0.05 < waste[False]


def test_best_fit_decreasing_fits_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.pareto(1.0, 5000).astype(np.int64) * 20 + 1, 4096)
    bins = best_fit_decreasing(lengths, 4096)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert max(lengths[b].sum() for b in bins) <= 4096
    assert len(bins) <= -(-lengths.sum() // 4096) * 1.02 + 1  # within 2% of the lower bound
    assert bins == best_fit_decreasing(lengths, 4096)


def test_block_causal_mask_confines_attention_to_each_sample():
    cu = torch.tensor([0, 3, 7, 8, 10, 10], dtype=torch.int32)
    mask = block_causal_mask(cu, 10)
    assert mask.shape == (1, 10, 10) and mask.dtype == torch.bool
    segment = [0, 0, 0, 1, 1, 1, 1, 2, 3, 3]
    for q in range(10):
        for k in range(10):
            allowed = segment[q] == segment[k] and k <= q
            assert mask[0, q, k].item() == (not allowed)
    batched = block_causal_mask(torch.stack([cu, torch.tensor([0, 10, 10, 10, 10, 10])]), 10)
    assert batched.shape == (2, 1, 10, 10)
    assert torch.equal(batched[0], mask)
    assert torch.equal(batched[1, 0], ~torch.ones(10, 10, dtype=torch.bool).tril())


def test_truncation_right_keeps_the_beginning_and_drop_drops(tmp_path, tok, tok_dir):
    long = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": " fox" * 200}]
    short = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    long_prompt = [{"role": "user", "content": " fox" * 200}, {"role": "assistant", "content": "b"}]
    path = write_conversations(tmp_path / "d.jsonl", [long, short, long, long_prompt, short])
    base = dict(path=str(path), cache_dir=str(tmp_path / "c"))
    right, _ = build_sft_datasets(cfg(truncation="right", **base), str(tok_dir), 64, 0)
    assert right.stats | {"tokens": 0, "padding": 0} == {
        "samples": 4, "sequences": 4, "tokens": 0, "padding": 0, "truncated": 2,
        "dropped_long": 0, "dropped_untrained": 1,
    }  # fmt: skip
    full = tokenize_conversation(long, tok, cfg())["input_ids"]
    firsts = [right[i]["tokens"][:64].tolist() for i in range(len(right))]
    assert firsts.count(full[:64]) == 2
    drop, _ = build_sft_datasets(cfg(truncation="drop", **base), str(tok_dir), 64, 0)
    assert (drop.stats["samples"], drop.stats["dropped_long"], drop.stats["truncated"]) == (2, 3, 0)


def test_validation_split_is_deterministic_and_disjoint(tmp_path, tok_dir):
    convs = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        for i in range(200)
    ]
    path = write_conversations(tmp_path / "d.jsonl", convs)
    config = cfg(path=str(path), val_ratio=0.1, cache_dir=str(tmp_path / "c"))

    def ids(ds) -> set:
        return {
            tuple(ds[i]["tokens"][ds[i]["loss_mask"].argmax() :].tolist()) for i in range(len(ds))
        }

    train, val = build_sft_datasets(config, str(tok_dir), 32, seed=0)
    assert (train.stats["samples"], val.stats["samples"]) == (180, 20)
    assert not ids(train) & ids(val)
    _, again = build_sft_datasets(config, str(tok_dir), 32, seed=99)  # train.seed: same split
    assert ids(again) == ids(val)
    config.seed = 1
    _, other = build_sft_datasets(config, str(tok_dir), 32, seed=0)
    assert ids(other) != ids(val)
    vpath = write_conversations(tmp_path / "v.jsonl", convs[:7])
    config = cfg(path=str(path), val_path=str(vpath), cache_dir=str(tmp_path / "c"))
    train, val = build_sft_datasets(config, str(tok_dir), 32, seed=0)
    assert (train.stats["samples"], val.stats["samples"]) == (200, 7)


def test_weights_blend_files_in_proportion(tmp_path, tok_dir):
    a = write_conversations(tmp_path / "a.jsonl", [CONVERSATION] * 40)
    b = write_conversations(tmp_path / "b.jsonl", [CONVERSATION[:3]] * 60)
    config = cfg(path=[str(a), str(b)], weights=[3, 1], cache_dir=str(tmp_path / "c"))
    train, _ = build_sft_datasets(config, str(tok_dir), 64, seed=0)
    counts = np.bincount(train.refs[:, 0], minlength=2)
    assert counts.tolist() == [75, 25]  # 100 draws; file a (40 samples) cycled
    assert np.bincount(train.refs[train.refs[:, 0] == 0, 1]).min() >= 1  # every a sample drawn


def test_cache_is_reused_and_keyed_by_settings(tmp_path, tok_dir, monkeypatch, caplog):
    path = write_conversations(tmp_path / "d.jsonl", random_conversations(30))
    config = cfg(path=str(path), cache_dir=str(tmp_path / "c"))
    first, _ = build_sft_datasets(config, str(tok_dir), 128, seed=0)
    entries = set((tmp_path / "c").glob("*.json"))

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized although cached")

    with monkeypatch.context() as m, caplog.at_level(logging.INFO, logger="mtrain.data"):
        m.setattr(sft_cache, "_write", refuse)
        again, _ = build_sft_datasets(config, str(tok_dir), 128, seed=0)
        packed, _ = build_sft_datasets(  # settings applied after the cache share its entry
            cfg(path=str(path), cache_dir=str(tmp_path / "c"), packing=True, truncation="drop"),
            str(tok_dir), 64, seed=1,
        )  # fmt: skip
    assert "(cached)" in caplog.text
    assert all(torch.equal(first[i]["tokens"], again[i]["tokens"]) for i in range(len(first)))
    for change in (
        {"train_on": "last"},
        {"system": "S"},
        {"template": "qwen3"},
        {"thinking": "off"},
    ):
        config = cfg(path=str(path), cache_dir=str(tmp_path / "c"), **change)
        build_sft_datasets(config, str(tok_dir), 128, 0)
    assert len(set((tmp_path / "c").glob("*.json")) - entries) == 4


def test_failed_tokenization_leaves_no_cache_entry(tmp_path, tok_dir):
    lines = [json.dumps(RECORDS["openai"])] * 3 + ["{broken"]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:4: not valid JSON"):
        build_sft_datasets(cfg(path=str(path), cache_dir=str(tmp_path / "c")), str(tok_dir), 64, 0)
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["hashes"]


def mixed_records(n: int) -> list[str]:
    """JSONL lines of `n` conversations for the spaced template, a fifth of them with a turn
    whose boundary falls inside a token, and two unparsable lines."""
    lines = []
    for i, conv in enumerate(random_conversations(n, seed=5)):
        for m in conv:
            if m["role"] == "assistant" and i % 5:
                m["content"] = "! " + m["content"]  # "assistant: !" splits before the content
        lines.append(json.dumps({"messages": conv}))
    lines.insert(n // 3, "{broken")
    lines.insert(2 * n // 3, "[1, 2")
    return lines


def test_workers_write_the_serial_cache_byte_for_byte(
    tmp_path, spaced_tok_dir, monkeypatch, cache_contents
):
    """Two worker processes, batches of 7 records (several in flight, back in order), bad records
    of both kinds among them (unparsable; a token across a turn boundary): the same entry name
    (data.workers is not in the key) and the same bytes; without skip_bad, the same error."""
    monkeypatch.setattr(sft_encode, "WORKER_BATCH", 7)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(mixed_records(60)) + "\n")
    caches, stats = {}, {}
    for workers in (1, 2):
        config = cfg(
            path=str(path), cache_dir=str(tmp_path / f"c{workers}"), skip_bad=True, workers=workers
        )
        train, _ = build_sft_datasets(config, str(spaced_tok_dir), 4096, 0)
        caches[workers], stats[workers] = cache_contents(tmp_path / f"c{workers}"), train.stats
    meta = json.loads(next(v for k, v in caches[1].items() if k.endswith(".json")))
    assert meta["bad"] == 2 + 12 and meta["samples"] == 48  # 12 conversations refused
    assert caches[2] == caches[1] and stats[2] == stats[1]
    errors = []
    for workers in (1, 2):
        config = cfg(path=str(path), cache_dir=str(tmp_path / f"e{workers}"), workers=workers)
        with pytest.raises(DataError) as err:
            build_sft_datasets(config, str(spaced_tok_dir), 4096, 0)
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "d.jsonl:1: a token spans the boundary" in errors[0]


def test_a_worker_that_cannot_start_is_an_error_not_a_wait():
    workers = pool.start(2, operator.truediv, (1, 0))  # every worker's initializer raises
    try:
        with pytest.raises(ConfigError, match="data.workers: a tokenization worker process"):
            list(pool.in_order(workers, abs, range(4), window=4))
    finally:
        pool.stop(workers)


def test_progress_lines_give_the_rate_and_the_time_left(tmp_path, tok_dir, monkeypatch, caplog):
    monkeypatch.setattr(progress, "INTERVAL_SECONDS", 0.0)
    monkeypatch.setattr(sft_encode, "BATCH", 10)
    path = write_conversations(tmp_path / "d.jsonl", random_conversations(30))
    with caplog.at_level(logging.INFO, logger="mtrain.data"):
        build_sft_datasets(cfg(path=str(path), cache_dir=str(tmp_path / "c")), str(tok_dir), 64, 0)
    lines = [r.getMessage() for r in caplog.records]
    ticks = [line for line in lines if "conversations/s" in line]
    assert len(ticks) == 3, lines
    assert re.fullmatch(
        r"data: \S+d\.jsonl: 10/30 \(33%\) conversations, [\d,]+ conversations/s, "
        r"[\d,]+ tokens/s, elapsed \d:\d\d:\d\d, ETA \d:\d\d:\d\d",
        ticks[0],
    ), ticks[0]
    assert "30/30 (100%)" in ticks[-1] and "tokenized in" in lines[lines.index(ticks[-1]) + 1]


# --- config ---------------------------------------------------------------------------------------


def test_config_is_a_structured_hydra_schema():
    merged = OmegaConf.merge(
        OmegaConf.structured(SFTDataConfig),
        {"path": ["a.jsonl"], "columns": {"instruction": "prompt"}, "packing": True},
    )
    config = OmegaConf.to_object(merged)
    assert config.columns == {"instruction": "prompt"} and config.validate() is config


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": "csv"}, "data.format=csv is not one of"),
        ({"template": "mistral"}, "data.template=mistral is not one of"),
        ({"train_on": "user"}, "data.train_on=user"),
        ({"columns": {"question": "q"}}, "data.columns.question is not a renamable field"),
        ({"val_ratio": 1.0}, r"data.val_ratio=1.0 must be in \[0, 1\)"),
        ({"val_ratio": 0.1, "val_path": "v.jsonl"}, "not both"),
        ({"weights": [1.0, 2.0]}, "data.weights gives 2 weight"),
        ({"workers": 0}, "data.workers=0 must be >= 1"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        cfg(**changes).validate()
