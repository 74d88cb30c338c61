"""Tool use, separate reasoning and the Qwen3 default for real chat data.

References: the published Qwen3, Qwen2.5 and Llama 3 chat templates (tests/chat_templates.py)
through transformers' `apply_chat_template`, whose `return_assistant_tokens_mask` gives the
loss mask of each turn; and strings written by hand."""

from __future__ import annotations

import json
import logging

import pytest

from mtrain.config.sft_data import SFTDataConfig
from mtrain.data import formats
from mtrain.data.sft import tokenize_conversation
from mtrain.data.templates import resolve_template
from mtrain.errors import ConfigError, DataError
from tests import chat_templates as published

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CHAT = [  # one query, a reasoned tool call, its result, a reasoned answer
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "weather in paris"},
    {"role": "assistant", "content": "", "reasoning_content": "need data", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 degrees", "reasoning_content": "easy"},
]
MULTI_TURN = [
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "<think>\ngreet\n</think>\n\nhi there"},
    {"role": "user", "content": "and now"},
    {"role": "assistant", "content": "done", "reasoning_content": "finish"},
]


def cfg(**kw) -> SFTDataConfig:
    return SFTDataConfig(path="unused.jsonl", **kw)


def with_tools(conversation: list[dict]) -> list[dict]:
    return [{**conversation[0], "tools": TOOLS}, *conversation[1:]]


def reference(tok, conversation, template: str, **kwargs) -> tuple[list[int], list[int]]:
    """(ids, labels) from transformers with the annotated published template."""
    tools = conversation[0].get("tools")
    messages = [{k: v for k, v in m.items() if k != "tools"} for m in conversation]
    out = tok.apply_chat_template(
        messages, tools=tools, chat_template=template, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True, **kwargs,
    )  # fmt: skip
    ids = out["input_ids"]
    return ids, [t if m else -100 for t, m in zip(ids, out["assistant_masks"])]


@pytest.mark.parametrize(
    "plain, annotated, conversation",
    [
        ("QWEN3", "annotated_qwen3", TOOL_CHAT),
        ("QWEN2_5", "annotated_qwen2_5", TOOL_CHAT),
        ("QWEN2_5", "annotated_qwen2_5", MULTI_TURN[:2] + [{"role": "user", "content": "x"},
                                                          {"role": "assistant", "content": "y"}]),
        ("LLAMA3", "annotated_llama3", [{"role": "user", "content": "a"},
                                        {"role": "assistant", "content": "b"},
                                        {"role": "user", "content": "c"},
                                        {"role": "assistant", "content": "d"}]),
    ],
)  # fmt: skip
def test_annotated_templates_render_as_published(tok, plain, annotated, conversation):
    convo = with_tools(conversation) if plain != "LLAMA3" else conversation
    tools = convo[0].get("tools")
    messages = [{k: v for k, v in m.items() if k != "tools"} for m in convo]
    extra = {"bos_token": "<|begin_of_text|>"} if plain == "LLAMA3" else {}
    texts = [
        tok.apply_chat_template(messages, tools=tools, chat_template=t, tokenize=False, **extra)
        for t in (getattr(published, plain), getattr(published, annotated)())
    ]
    assert texts[0] == texts[1]


@pytest.mark.parametrize("template", ["qwen3", "tokenizer"])
def test_qwen3_tool_calls_and_reasoning_match_the_published_template(tok, template):
    """Built-in qwen3 and the tokenizer's own (the published one) give the published ids and
    masks: calls trained with their turn, results not, reasoning_content inside <think>."""
    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.chat_template = published.QWEN3
    convo = with_tools(TOOL_CHAT)
    got = tokenize_conversation(convo, tok, cfg(template=template))
    ids, labels = reference(tok, convo, published.annotated_qwen3())
    assert got["input_ids"] == ids and got["labels"] == labels
    trained = tok.decode([t for t in labels if t != -100])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in trained
    assert "temp" not in trained and "<think>\nneed data\n</think>" in trained


def test_qwen2_5_tools_match_the_published_template(tok):
    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.chat_template = published.QWEN2_5
    convo = with_tools(
        [TOOL_CHAT[0], TOOL_CHAT[1], {"role": "assistant", "content": "", "tool_calls": [CALL]},
         TOOL_CHAT[3], {"role": "assistant", "content": "21 degrees"}]
    )  # fmt: skip
    ids, labels = reference(tok, convo, published.annotated_qwen2_5())
    for template in ("tokenizer", "qwen2_5"):
        got = tokenize_conversation(convo, tok, cfg(template=template))
        assert got["input_ids"] == ids and got["labels"] == labels, template


@pytest.fixture
def llama_tok(tok):
    copy = tok.__class__.from_pretrained(tok.name_or_path)
    copy.add_special_tokens(
        {"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                       "<|end_header_id|>", "<|eot_id|>"]}
    )  # fmt: skip
    return copy


def test_llama3_multi_turn_masks_match_the_published_template(llama_tok):
    tok = llama_tok
    tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = published.LLAMA3
    convo = [
        {"role": "system", "content": "S"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]  # fmt: skip
    ids, labels = reference(tok, convo, published.annotated_llama3())
    for template in ("tokenizer", "llama3"):
        got = tokenize_conversation(convo, tok, cfg(template=template))
        assert got["input_ids"] == ids and got["labels"] == labels, template


@pytest.fixture
def qwen3_tok(tok, tmp_path):
    """The tiny tokenizer as a Qwen3 model directory: the published template, model_type qwen3."""
    copy = tok.__class__.from_pretrained(tok.name_or_path)
    copy.chat_template = published.QWEN3
    copy.save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    return tok.__class__.from_pretrained(str(tmp_path))


def test_qwen3_default_trains_multi_turn_keeping_every_turns_reasoning(qwen3_tok, caplog):
    with caplog.at_level(logging.INFO, logger="mtrain.data"):
        assert resolve_template("auto", qwen3_tok).fmt.name == "qwen3"
    assert "keeps every assistant turn with its reasoning" in caplog.text
    got = tokenize_conversation(MULTI_TURN, qwen3_tok, cfg())
    spans, current = [], []
    for t, label in zip(got["input_ids"], got["labels"]):
        if label != -100:
            current.append(t)
        elif current:
            spans.append(qwen3_tok.decode(current))
            current = []
    spans += [qwen3_tok.decode(current)] if current else []
    assert spans == [
        "<think>\ngreet\n</think>\n\nhi there<|im_end|>",
        "<think>\nfinish\n</think>\n\ndone<|im_end|>",
    ]
    # The final turn as Qwen3's own template renders the whole conversation at inference.
    last = qwen3_tok.apply_chat_template(
        [{"role": "user", "content": "and now"}, MULTI_TURN[3]], tokenize=False
    )
    assert qwen3_tok.decode(got["input_ids"]).endswith(last)


def test_qwen3_thinking_off_drops_reasoning_content(qwen3_tok):
    got = tokenize_conversation(MULTI_TURN[:2], qwen3_tok, cfg(thinking="off"))
    assert qwen3_tok.decode([t for t in got["labels"] if t != -100]) == "hi there<|im_end|>"


SHAREGPT_TOOLS = {
    "system": "Be brief.",
    "tools": json.dumps(TOOLS),
    "conversations": [
        {"from": "human", "value": "weather in paris"},
        {"from": "function_call", "value": json.dumps(CALL["function"])},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "21 degrees"},
    ],
}
OPENAI_TOOLS = {
    "tools": TOOLS,
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather in paris"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "1"},
        {"role": "assistant", "content": "21 degrees"},
    ],
}


def test_sharegpt_function_calls_read_as_openai_tool_calls():
    names = {f: formats.columns_for(f, None) for f in formats.DEFAULT_COLUMNS}
    ours = formats.to_messages(SHAREGPT_TOOLS, "sharegpt", names["sharegpt"])
    theirs = formats.to_messages(OPENAI_TOOLS, "openai", names["openai"])
    assert ours == theirs
    assert ours[0]["tools"] == TOOLS and ours[2]["tool_calls"] == [CALL]
    assert ours[3] == {"role": "tool", "content": '{"temp": 21}'}


@pytest.mark.parametrize(
    "turns, message",
    [
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"},
          {"role": "assistant", "content": "a"}], "message 2 is a tool result, but message 1"),
        ([{"role": "user", "content": "q"},
          {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}],
         "tool call 1 needs a 'name'"),
    ],
)  # fmt: skip
def test_malformed_tool_use_is_a_bad_record(turns, message):
    names = formats.columns_for("openai", None)
    with pytest.raises(DataError, match=message):
        formats.to_messages({"messages": turns}, "openai", names)


def test_a_template_without_tools_refuses_them_by_name(llama_tok):
    with pytest.raises(ConfigError, match="data.template=llama3 does not render tools"):
        resolve_template("llama3", llama_tok).render([with_tools(TOOL_CHAT)], False)
