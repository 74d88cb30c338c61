"""SFT records -> conversations: `[{"role": "system"|"user"|"assistant", "content": str}, ...]`.

Three record layouts are read, from JSONL, JSON (a list of records) or Parquet:

    alpaca    {"instruction", "input", "output", "system"?, "history"?: [[user, assistant], ...]}
    sharegpt  {"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}], "system"?,
               "tools"?}; `function_call` / `observation` turns are tool calls and results
    openai    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content",
               "tool_calls"?, "reasoning_content"?}], "tools"?}

Tool use and separate reasoning are kept in the message form tools.py describes.

`data.columns` renames fields (`instruction`, `input`, `output`, `system`, `history` for alpaca;
`messages`, `role`, `content`, `system`, `tools` for sharegpt/openai, which differ only in their
default names) and adds speaker names (`user_tag`, `assistant_tag`, `observation_tag`,
`function_tag`, `system_tag`, as LLaMA-Factory's tags name them). With `data.format=auto` a
file's layout is taken from its first usable record.

A record that cannot be read says where it is (`train.jsonl:17: ...`, `data.json:230: ...`,
`data.parquet: row 12: ...`); the caller either stops or, with `data.skip_bad`, counts it.
DPO's preference records (pairs.py) are read with the same pieces: `parsed`, `alpaca_prompt`,
`to_message`, `field_text`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mtrain.data import sources, tools
from mtrain.errors import DataError

Messages = list[dict[str, Any]]

# Speaker names a dataset may add (LLaMA-Factory's tags), and what a turn of each is.
SPEAKER_TAGS = {
    "user_tag": "user", "assistant_tag": "assistant", "observation_tag": "observation",
    "function_tag": "function_call", "system_tag": "system",
}  # fmt: skip

DEFAULT_COLUMNS = {
    "alpaca": {
        "instruction": "instruction", "input": "input", "output": "output",
        "system": "system", "history": "history",
    },
    "sharegpt": {
        "messages": "conversations", "role": "from", "content": "value", "system": "system",
        "tools": "tools", **dict.fromkeys(SPEAKER_TAGS),
    },
    "openai": {
        "messages": "messages", "role": "role", "content": "content", "system": "system",
        "tools": "tools", **dict.fromkeys(SPEAKER_TAGS),
    },
}  # fmt: skip

# Speaker names found in the wild -> the three roles SFT trains with.
ROLES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant",
    "tool": "tool", "observation": "tool", "function": "tool", "ipython": "tool",
    "function_call": "assistant",  # sharegpt: its value is the call
}  # fmt: skip
PARQUET_BATCH = 4096  # rows decoded at a time


def records(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, parsed record) for every record of a JSONL, JSON or Parquet file, in order.

    An unparsable JSONL line comes back as a `DataError` in place of the record, so the caller
    can skip it; a damaged JSON or Parquet file cannot be read past the damage and raises.
    """
    fmt = sources.format_of(path)
    if fmt == "jsonl":
        yield from _jsonl_records(path)
    elif fmt == "json":
        yield from _json_records(path)
    elif fmt == "parquet":
        yield from _parquet_records(path)
    else:
        raise DataError(f"{path}: SFT data must be a .jsonl, .json or .parquet file")


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    lineno = 0
    for chunk in sources.chunks(path, "jsonl", "", workers=1):  # bounded reads of a big file
        lines, _ = sources._lines(chunk)
        for line in lines:
            lineno += 1
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                yield (
                    f"{path}:{lineno}",
                    DataError(f"not valid JSON ({err.msg} at column {err.colno})"),
                )
            except UnicodeDecodeError as err:
                yield (
                    f"{path}:{lineno}",
                    DataError(f"not valid UTF-8 ({err.reason} at byte {err.start})"),
                )


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Records of a JSON list, each located by the line it starts on."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    decoder, pos, line, counted = json.JSONDecoder(), 0, 1, 0

    def skip_space(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def where(i: int) -> str:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return f"{path}:{line}"

    pos = skip_space(pos)
    if text.startswith("{", pos):  # one record per line in a .json file, as `datasets` reads it
        while pos < len(text):
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise DataError(f"{where(err.pos)}: not valid JSON ({err.msg})") from None
            yield where(pos), record
            pos = skip_space(end)
        return
    if not text.startswith("[", pos):
        raise DataError(
            f"{where(pos)}: expected a JSON list of records, or one JSON object per line"
        )
    pos = skip_space(pos + 1)
    while not text.startswith("]", pos):
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{where(err.pos)}: not valid JSON ({err.msg})") from None
        yield where(pos), record
        pos = skip_space(end)
        if text.startswith(",", pos):
            pos = skip_space(pos + 1)
        elif not text.startswith("]", pos):
            raise DataError(f"{where(pos)}: not valid JSON (expected ',' or ']' after a record)")


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    table = sources.open_parquet(path)
    row = 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}: row {row}", record


class ReadStats:
    """What reading one file found: its format, and its malformed records, which stop the
    reading at the first or, with `skip=True` (data.skip_bad), are counted and skipped."""

    def __init__(self, skip: bool):
        self.skip, self.bad, self.first_bad, self.format = skip, 0, "", None

    def bad_record(self, where: str, err: DataError) -> None:
        if not self.skip:
            raise DataError(f"{where}: {err}") from None
        self.bad += 1
        self.first_bad = self.first_bad or f"{where}: {err}"


def conversations(
    path: Path, fmt: str, renames: dict[str, str] | None, stats: ReadStats
) -> Iterator[tuple[str, Messages]]:
    """(location, conversation) of every good record of `path`; `fmt` may be "auto"."""
    names = {f: columns_for(f, renames) for f in DEFAULT_COLUMNS}
    return parsed(
        path, fmt, stats, lambda r: detect(r, renames), lambda r, f: to_messages(r, f, names[f])
    )


def parsed(
    path: Path,
    fmt: str,
    stats: ReadStats,
    layout_of: Callable[[Any], str],
    parse: Callable[[Any, str], Any],
) -> Iterator[tuple[str, Any]]:
    """(location, parse(record, format)) of every good record of `path`. With fmt="auto" the
    first usable record decides the file's format (`layout_of`); bad records go to `stats`."""
    stats.format = None if fmt == "auto" else fmt
    for where, record in records(path):
        try:
            if isinstance(record, DataError):
                raise record
            if stats.format is None:
                stats.format = layout_of(record)
            yield where, parse(record, stats.format)
        except DataError as err:
            stats.bad_record(where, err)


def columns_for(
    fmt: str, renames: dict[str, str] | None, table: dict[str, dict] = DEFAULT_COLUMNS
) -> dict[str, str]:
    """The field names of `fmt` in `table` after `data.columns` renames (other names ignored)."""
    names = dict(table[fmt])
    names.update({k: v for k, v in (renames or {}).items() if k in names})
    return names


def detect(record: Any, renames: dict[str, str] | None) -> str:
    """The layout of `record`: openai, sharegpt or alpaca."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    renames = renames or {}
    for key in [renames["messages"]] if "messages" in renames else ["messages", "conversations"]:
        turns = record.get(key)
        if isinstance(turns, list):
            first = turns[0] if turns and isinstance(turns[0], dict) else {}
            for fmt in ("openai", "sharegpt"):
                if columns_for(fmt, renames)["role"] in first:
                    return fmt
            return "sharegpt" if key == "conversations" else "openai"
    if columns_for("alpaca", renames)["instruction"] in record:
        return "alpaca"
    fields = ", ".join(map(repr, list(record)[:8])) or "none"
    raise DataError(
        f"cannot tell the record format (fields: {fields}); set data.format=alpaca|sharegpt|openai "
        "and data.columns to name the fields"
    )


def to_messages(record: Any, fmt: str, names: dict[str, str]) -> Messages:
    """The checked conversation of one record of layout `fmt` with field `names`."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        messages = alpaca_prompt(record, names)
        messages.append({"role": "assistant", "content": field_text(record, names["output"])})
    else:
        messages = _chat(record, names)
    check(messages)
    return messages


def alpaca_prompt(record: dict, names: dict[str, str]) -> Messages:
    """An alpaca record's conversation up to its final user turn (instruction + input)."""
    messages = []
    system = field_text(record, names["system"], optional=True)
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get(names["history"])
    for n, pair in enumerate(history or [], 1):
        if not (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(t, str) for t in pair)
        ):
            raise DataError(
                f"{names['history']!r} entry {n} is not a [user, assistant] pair of strings"
            )
        messages += [
            {"role": "user", "content": pair[0]},
            {"role": "assistant", "content": pair[1]},
        ]
    instruction = field_text(record, names["instruction"])
    extra = field_text(record, names["input"], optional=True)
    prompt = f"{instruction}\n{extra}" if instruction and extra else instruction or extra
    messages.append({"role": "user", "content": prompt})
    return messages


def _chat(record: dict, names: dict[str, str]) -> Messages:
    key = names["messages"]
    turns = record.get(key)
    if not isinstance(turns, list):
        found = "missing" if turns is None else type(turns).__name__
        raise DataError(
            f"field {key!r} must be a list of messages, got {found}; set data.columns.messages"
        )
    messages = []
    system = field_text(record, names["system"], optional=True)
    if system:
        messages.append({"role": "system", "content": system})
    messages += [to_message(turn, f"message {n}", names) for n, turn in enumerate(turns, 1)]
    offered = tools.parse_tools(record.get(names["tools"]), f"field {names['tools']!r}")
    if offered and messages:
        messages[0] = {**messages[0], tools.TOOLS: offered}
    return messages


def to_message(turn: Any, what: str, names: dict[str, str]) -> dict[str, Any]:
    """One sharegpt/openai turn (`names["role"]`, `names["content"]`) as {"role", "content"}
    (plus `tool_calls` / `reasoning_content` where it has them, see tools.py)."""
    role_key, content_key = names["role"], names["content"]
    calls = turn.get("tool_calls") if isinstance(turn, dict) else None
    if calls is not None and content_key in turn and turn[content_key] is None:
        turn = {**turn, content_key: ""}  # OpenAI: a pure tool call has content null
    elif calls is not None and content_key not in turn:
        turn = {**turn, content_key: ""}
    if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
        keys = ", ".join(map(repr, turn)) if isinstance(turn, dict) else type(turn).__name__
        raise DataError(
            f"{what} needs fields {role_key!r} and {content_key!r} (has {keys}); "
            "set data.columns.role / data.columns.content"
        )
    speaker = _speaker(turn[role_key], what, names)
    role = ROLES[speaker]
    if speaker == "function_call":  # sharegpt: the value is the call itself
        return {
            "role": role,
            "content": "",
            "tool_calls": tools.parse_tool_calls(turn[content_key], what),
        }
    message: dict[str, Any] = {"role": role, "content": as_text(turn[content_key], what)}
    if role == "assistant":
        if calls is not None:
            message["tool_calls"] = tools.parse_tool_calls(calls, what)
        reasoning = tools.reasoning_of(turn, what)
        if reasoning is not None:
            message["reasoning_content"] = reasoning
    return message


def _speaker(value: Any, what: str, names: dict[str, str]) -> str:
    """The ROLES key of a turn's speaker `value`: a name the data's speaker tags give
    (`names["user_tag"]`, ...), else one of the names found in the wild, in any case."""
    for tag, speaker in SPEAKER_TAGS.items():
        if names.get(tag) is not None and value == names[tag]:
            return speaker
    speaker = str(value).lower()
    if speaker not in ROLES:
        tagged = [str(names[t]) for t in SPEAKER_TAGS if names.get(t) is not None]
        raise DataError(
            f"{what} has role {value!r}; known roles: {', '.join(sorted({*ROLES, *tagged}))}"
        )
    return speaker


def field_text(record: dict, key: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None:
        if optional:
            return ""
        fields = ", ".join(map(repr, list(record)[:8])) or "none"
        raise DataError(f"no field {key!r} (fields: {fields}); set data.columns")
    return as_text(value, f"field {key!r}")


def as_text(value: Any, what: str) -> str:
    """A string; OpenAI-style content parts `[{"type": "text", "text": ...}]` are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in value
    ):
        return "".join(str(p.get("text", "")) for p in value)
    raise DataError(f"{what} is {type(value).__name__}, not a string (only text is supported)")


def check(messages: Messages) -> None:
    """What every template and the loss mask rely on."""
    for n, m in enumerate(messages):
        if m["role"] == "system" and n > 0:
            raise DataError(f"message {n + 1} is a system message; only the first may be")
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise DataError("the conversation is empty")
    if body[0]["role"] != "user":
        raise DataError(f"the conversation starts with a {body[0]['role']} turn, not a user turn")
    if body[-1]["role"] != "assistant":
        raise DataError(
            f"the conversation ends with a {body[-1]['role']} turn; nothing to train on"
        )
    tools.check_tool_turns(messages)
