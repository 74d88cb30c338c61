"""Tool use and reasoning in SFT records: what the record layouts carry, in one message form.

A conversation's messages may carry, besides `role` and `content`:

    reasoning_content  (assistant) the model's reasoning, as Qwen3 / DeepSeek-style datasets
                       store it apart from the answer
    tool_calls         (assistant) [{"type": "function", "function": {"name", "arguments"}}],
                       arguments a JSON object (or the string a dataset stored)
    role "tool"        a tool's result (OpenAI `tool`, sharegpt `observation`)

and the tools offered (a list of function schemas, the record's `tools` field; a JSON string of
that list is read too, as LLaMA-Factory's sharegpt files store it) ride on the first message
under `tools`, so that every prefix of the conversation keeps them. sharegpt's `function_call`
turn (its value a JSON call, or a list of calls) becomes an assistant message with `tool_calls`.
Templates render all of it as the model's official template does; tool results are never trained,
tool calls are (they are the assistant's turn).
"""

from __future__ import annotations

import json
from typing import Any

from mtrain.errors import DataError

TOOLS = "tools"


def parse_tools(value: Any, what: str) -> list[dict] | None:
    """The record's tools: a list of function schemas (or its JSON text); None when absent."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"{what} is not valid JSON ({err.msg})") from None
    if isinstance(value, dict):
        value = [value]
    if not (isinstance(value, list) and all(isinstance(t, dict) for t in value)):
        raise DataError(f"{what} must be a list of function schemas (JSON objects)")
    return value


def parse_tool_calls(value: Any, what: str) -> list[dict]:
    """OpenAI `tool_calls`, or sharegpt's function_call value, as
    [{"type": "function", "function": {"name", "arguments"}}]."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"{what}: the tool call is not valid JSON ({err.msg})") from None
    calls = value if isinstance(value, list) else [value]
    out = []
    for n, call in enumerate(calls, 1):
        inner = call.get("function", call) if isinstance(call, dict) else None
        if not (isinstance(inner, dict) and isinstance(inner.get("name"), str)):
            raise DataError(f"{what}: tool call {n} needs a 'name' (and 'arguments')")
        arguments = inner.get("arguments", {})
        if not isinstance(arguments, (dict, str)):
            raise DataError(
                f"{what}: tool call {n} has arguments of type {type(arguments).__name__}"
            )
        out.append(
            {"type": "function", "function": {"name": inner["name"], "arguments": arguments}}
        )
    if not out:
        raise DataError(f"{what}: an empty list of tool calls")
    return out


def reasoning_of(turn: dict, what: str) -> str | None:
    """An assistant turn's separate reasoning (`reasoning_content`, or `reasoning`)."""
    for key in ("reasoning_content", "reasoning"):
        value = turn.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise DataError(f"{what}: {key} is {type(value).__name__}, not a string")
            return value
    return None


def check_tool_turns(messages: list[dict]) -> None:
    """A tool result follows an assistant turn that called a tool (or another result)."""
    for n, m in enumerate(messages):
        if m["role"] != "tool":
            continue
        before = messages[n - 1] if n else None
        if before is None or not (before["role"] == "tool" or before.get("tool_calls")):
            raise DataError(
                f"message {n + 1} is a tool result, but message {n} is not a tool call "
                "(an assistant turn with tool_calls) or another result"
            )


def tools_of(messages: list[dict]) -> list[dict] | None:
    return messages[0].get(TOOLS) if messages else None


def without_tools(messages: list[dict]) -> list[dict]:
    """The messages as templates take them (tools passed apart)."""
    if not messages or TOOLS not in messages[0]:
        return messages
    first = {k: v for k, v in messages[0].items() if k != TOOLS}
    return [first, *messages[1:]]


def chatml_tools_system(tools: list[dict], system: str | None) -> str:
    """The system turn Qwen2.5's and Qwen3's templates write when tools are offered."""
    lines = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "<|im_start|>system\n"
        + (system + "\n\n" if system else "")
        + "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
        + lines
        + "\n</tools>\n\nFor each function call, return a json object with function name and "
        'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": '
        '<function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    )


def chatml_tool_calls(calls: list[dict], content: str, raw_strings: bool) -> str:
    """The `<tool_call>` blocks after an assistant turn's content, as those templates write them
    (arguments stored as a string: written as they are by Qwen3's, as a JSON string by
    Qwen2.5's, which applies `tojson` to whatever it is given)."""
    out = []
    for n, call in enumerate(calls):
        fn = call["function"]
        args = fn["arguments"]
        if not (raw_strings and isinstance(args, str)):
            args = json.dumps(args, ensure_ascii=False)
        sep = "\n" if (n == 0 and content) or n > 0 else ""
        out.append(
            f'{sep}<tool_call>\n{{"name": "{fn["name"]}", "arguments": {args}}}\n</tool_call>'
        )
    return "".join(out)
