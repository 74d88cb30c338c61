"""LLaMA-Factory's dataset descriptions: `data.dataset_info=DIR/dataset_info.json` plus
`data.dataset=name[,name...]` instead of `data.path`, so an existing LLaMA-Factory data directory
trains without rewriting a file.

Each named entry becomes a `Dataset`: its files (`file_name`, relative to the directory of
dataset_info.json; a folder means every file in it, in name order) and the record layout and
field names mtrain reads them with, in `data.columns` terms (formats.py, pairs.py):

    formatting alpaca     columns prompt / query / response / history / system -> instruction /
                          input / output / history / system; ranking: chosen / rejected
    formatting sharegpt   columns messages / system / tools; tags role_tag / content_tag ->
    (and openai)          role / content, user_tag / assistant_tag / observation_tag /
                          function_tag / system_tag name the speakers; ranking: chosen / rejected

As in LLaMA-Factory, `history`, `system` and `tools` are read only where `columns` names them,
and `num_samples` draws that many samples of the dataset (every sample once before any twice).
`ranking: true` entries are preference pairs (mtrain.dpo), the others conversations
(mtrain.sft); the wrong kind, hub-only entries (`hf_hub_url`, `ms_hub_url`, `script_url`),
media columns and KTO's `kto_tag` are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtrain.data.sources import format_of
from mtrain.errors import ConfigError

__all__ = ["Dataset", "resolve", "names_of"]

FILE_NAME = "dataset_info.json"
ALPACA = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
}  # LF -> mtrain, = defaults
TAGS = {
    "role_tag": ("role", "from"),
    "content_tag": ("content", "value"),
}  # LF -> (mtrain, default)
SPEAKER_TAGS = ("user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
UNSUPPORTED_COLUMNS = {
    "images": "images", "videos": "videos", "audios": "audio",
}  # fmt: skip


@dataclass(frozen=True)
class Dataset:
    name: str
    files: tuple[str, ...]
    format: str  # mtrain's record layout: alpaca | sharegpt
    columns: dict[str, Any] = field(hash=False)  # data.columns names -> the dataset's fields
    num_samples: int | None = None


def names_of(value: Any) -> list[str]:
    """`data.dataset` as a list of names: "a,b", ["a", "b"] or None (no names)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [n.strip() for n in items if n.strip()]


def resolve(info: str, names: list[str], *, ranking: bool, key: str) -> list[Dataset]:
    """The datasets `names` (the value of config `key`) of LLaMA-Factory description `info`
    (a dataset_info.json file or its directory); `ranking` is the kind the run trains on."""
    path = Path(info).expanduser()
    if path.is_dir():
        path = path / FILE_NAME
    entries = _read(path)
    out = []
    for name in names:
        if name not in entries:
            known = ", ".join(sorted(entries)[:12]) or "none"
            raise ConfigError(f"{key}: {name!r} is not described in {path} (it has: {known})")
        where = f"{path}: dataset {name!r}"
        entry = entries[name]
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is {type(entry).__name__}, not a JSON object")
        out.append(_dataset(name, entry, path.parent, ranking, where))
    return out


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"data.dataset_info: {path} does not exist; give LLaMA-Factory's dataset_info.json "
            "or the directory that holds it"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"data.dataset_info: cannot read {path} ({err})") from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
        ) from None
    if not isinstance(entries, dict):
        raise ConfigError(f"{path}: expected a JSON object of dataset descriptions")
    return entries


def _dataset(name: str, entry: dict, root: Path, ranking: bool, where: str) -> Dataset:
    if "file_name" not in entry:
        hub = next((k for k in HUB_KEYS if k in entry), None)
        if hub:
            raise ConfigError(
                f"{where} lives on a hub ({hub}={entry[hub]!r}); mtrain reads local files "
                "only: download it and describe it with file_name"
            )
        raise ConfigError(f"{where} has no file_name; name its file or folder")
    kind = bool(entry.get("ranking", False))
    if kind != ranking:
        raise ConfigError(
            f"{where} is {'a preference (ranking)' if kind else 'a conversation'} dataset; "
            f"train it with mtrain.{'dpo' if kind else 'sft'}"
        )
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    for part, value in (("columns", columns), ("tags", tags)):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {part} must be a JSON object of names")
    if columns.get("kto_tag"):
        raise ConfigError(
            f"{where} is KTO data (columns.kto_tag); mtrain reads pairs and conversations"
        )
    for column, what in UNSUPPORTED_COLUMNS.items():
        if columns.get(column):
            raise ConfigError(f"{where} has {what} (columns.{column}); mtrain trains on text only")
    formatting = entry.get("formatting", "alpaca")
    if formatting == "alpaca":
        names = _alpaca_columns(columns, ranking, where)
    elif formatting in ("sharegpt", "openai"):
        names = _chat_columns(columns, tags, ranking)
    else:
        raise ConfigError(f"{where}: formatting {formatting!r} is not alpaca, sharegpt or openai")
    return Dataset(
        name,
        _files(entry["file_name"], root, where),
        "alpaca" if formatting == "alpaca" else "sharegpt",
        names,
        _num_samples(entry.get("num_samples"), where),
    )


def _alpaca_columns(columns: dict, ranking: bool, where: str) -> dict[str, Any]:
    if columns.get("tools"):
        raise ConfigError(
            f"{where}: mtrain reads tools from sharegpt/openai records only (columns.tools of an "
            "alpaca dataset); describe it with formatting sharegpt"
        )
    names: dict[str, Any] = {ours: columns.get(theirs, ours) for theirs, ours in ALPACA.items()}
    names["history"] = columns.get("history")
    names["system"] = columns.get("system")
    if ranking:
        names.pop("output")
        names.update(_sides(columns))
    return names


def _chat_columns(columns: dict, tags: dict, ranking: bool) -> dict[str, Any]:
    messages = columns.get("messages", "conversations")
    names: dict[str, Any] = {"conversations" if ranking else "messages": messages}
    names["system"] = columns.get("system")
    if not ranking:
        names["tools"] = columns.get("tools")
    names.update({ours: tags.get(theirs, default) for theirs, (ours, default) in TAGS.items()})
    names.update({t: tags[t] for t in SPEAKER_TAGS if tags.get(t)})
    if ranking:
        names.update(_sides(columns))
    return names


def _sides(columns: dict) -> dict[str, str]:
    return {side: columns.get(side) or side for side in ("chosen", "rejected")}


def _files(file_name: Any, root: Path, where: str) -> tuple[str, ...]:
    if not isinstance(file_name, str) or not file_name:
        raise ConfigError(f"{where}: file_name must name a file or folder")
    path = root / file_name
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ConfigError(f"{where}: folder {path} holds no file")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"{where}: file_name {file_name!r} is not in {root}")
    for f in files:
        if format_of(f) not in ("jsonl", "json", "parquet"):
            raise ConfigError(
                f"{where}: {f} is not a .json, .jsonl or .parquet file, which is what mtrain "
                "reads (convert it, e.g. CSV with pandas' to_json(lines=True))"
            )
    return tuple(str(f) for f in files)


def _num_samples(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: num_samples={value!r} must be a positive integer")
    return value
