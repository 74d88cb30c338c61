"""LLaMA-Factory data directories as they are: `data.dataset_info` + `data.dataset`.

The round trip: conversations written out in each layout LLaMA-Factory's data README describes
(alpaca with renamed columns, sharegpt with its default and with custom tags, OpenAI-style
messages described as sharegpt, a folder of files, preference pairs), together with their
dataset_info.json, read back through `data.dataset` equal the conversations written, and
tokenize to the same samples as the same conversations given by `data.path`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mtrain.config.dpo_data import DPODataConfig
from mtrain.config.sft_data import SFTDataConfig
from mtrain.data.pairs import build_pair_datasets
from mtrain.data.sft import build_sft_datasets, load_conversations
from mtrain.errors import ConfigError

CONVS = [
    [
        {"role": "system", "content": f"be brief {i}"},
        {"role": "user", "content": f"hello {i}"},
        {"role": "assistant", "content": f"the quick fox {i}"},
        {"role": "user", "content": f"and then {i}"},
        {"role": "assistant", "content": f"lazy dog {i}"},
    ]
    for i in range(6)
] + [[{"role": "user", "content": "only one"}, {"role": "assistant", "content": "turn"}]]

SPEAKERS = {"sharegpt": ("human", "gpt", "system"), "custom": ("USER", "BOT", "SYS")}


def alpaca(conv: list[dict]) -> dict:
    system = [m["content"] for m in conv if m["role"] == "system"]
    body = [m["content"] for m in conv if m["role"] != "system"]
    record = {"q": body[-2], "extra": "", "a": body[-1]}
    record["hist"] = [body[i : i + 2] for i in range(0, len(body) - 2, 2)]
    if system:
        record["sys"] = system[0]
    return record


def chat(conv: list[dict], style: str) -> dict:
    if style == "openai":
        return {"messages": conv}
    user, assistant, system = SPEAKERS[style]
    who = {"user": user, "assistant": assistant, "system": system}
    role, content = ("from", "value") if style == "sharegpt" else ("speaker", "text")
    return {"conversations": [{role: who[m["role"]], content: m["content"]} for m in conv]}


def write_jsonl(path: Path, records: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path.name


INFO = {
    "alpaca_renamed": {
        "file_name": "alpaca.json",
        "columns": {
            "prompt": "q", "query": "extra", "response": "a", "history": "hist", "system": "sys",
        },
    },
    "sharegpt_plain": {"file_name": "sharegpt.jsonl", "formatting": "sharegpt"},
    "openai_messages": {
        "file_name": "openai.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {
            "role_tag": "role", "content_tag": "content", "user_tag": "user",
            "assistant_tag": "assistant", "system_tag": "system",
        },
    },
    "custom_tags": {
        "file_name": "custom",  # a folder of two files
        "formatting": "sharegpt",
        "tags": {
            "role_tag": "speaker", "content_tag": "text", "user_tag": "USER",
            "assistant_tag": "BOT", "system_tag": "SYS",
        },
    },
}  # fmt: skip


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    (root / "alpaca.json").write_text(json.dumps([alpaca(c) for c in CONVS], indent=1))
    write_jsonl(root / "sharegpt.jsonl", [chat(c, "sharegpt") for c in CONVS])
    write_jsonl(root / "openai.jsonl", [chat(c, "openai") for c in CONVS])
    write_jsonl(root / "custom" / "part-0.jsonl", [chat(c, "custom") for c in CONVS[:3]])
    write_jsonl(root / "custom" / "part-1.jsonl", [chat(c, "custom") for c in CONVS[3:]])
    (root / "dataset_info.json").write_text(json.dumps(INFO, indent=2))
    return root


def cfg(root: Path, dataset, **kw) -> SFTDataConfig:
    return SFTDataConfig(dataset_info=str(root), dataset=dataset, **kw).validate()


@pytest.mark.parametrize("name", list(INFO))
def test_every_description_reads_back_the_conversations_written(data_dir, name):
    config = cfg(data_dir / "dataset_info.json", name)
    assert load_conversations(config, config.paths()) == CONVS


def test_columns_not_described_are_not_read_as_llama_factory_does(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"instruction": "q", "input": "x", "output": "a", "system": "S",
                    "history": [["h", "i"]]}) + "\n"
    )  # fmt: skip
    (tmp_path / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.jsonl"}}))
    config = cfg(tmp_path, "a")
    assert load_conversations(config, config.paths()) == [
        [{"role": "user", "content": "q\nx"}, {"role": "assistant", "content": "a"}]
    ]


def test_datasets_tokenize_as_the_same_conversations_given_by_path(data_dir, tok_dir):
    names = ",".join(INFO)
    cache = str(data_dir / "cache")
    by_name, _ = build_sft_datasets(cfg(data_dir, names, cache_dir=cache), str(tok_dir), 64, 0)
    direct = SFTDataConfig(path=[str(data_dir / "openai.jsonl")] * len(INFO), cache_dir=cache)
    by_path, _ = build_sft_datasets(direct, str(tok_dir), 64, 0)
    assert len(by_name) == len(by_path) == len(INFO) * len(CONVS)
    for i in range(len(by_path)):  # the same samples in the same order
        for key in ("tokens", "labels", "loss_mask"):
            assert np.array_equal(by_name[i][key].numpy(), by_path[i][key].numpy()), (i, key)


def test_tool_turns_with_llama_factorys_tags(tmp_path):
    call = {"name": "weather", "arguments": {"city": "Paris"}}
    tools = [{"name": "weather", "description": "w", "parameters": {"type": "object"}}]
    turns = [
        ("human", "weather?"), ("function_call", json.dumps(call)), ("observation", "sunny"),
        ("gpt", "It is sunny."),
    ]  # fmt: skip
    lf = {"conversations": [{"from": f, "value": v} for f, v in turns], "tl": json.dumps(tools)}
    renamed = {
        "conversations": [
            {"from": {"human": "U", "function_call": "CALL", "observation": "RES", "gpt": "A"}[f],
             "value": v} for f, v in turns
        ],
        "tl": json.dumps(tools),
    }  # fmt: skip
    write_jsonl(tmp_path / "plain.jsonl", [lf])
    write_jsonl(tmp_path / "renamed.jsonl", [renamed])
    info = {
        "plain": {"file_name": "plain.jsonl", "formatting": "sharegpt", "columns": {"tools": "tl"}},
        "renamed": {
            "file_name": "renamed.jsonl", "formatting": "sharegpt", "columns": {"tools": "tl"},
            "tags": {"user_tag": "U", "assistant_tag": "A", "function_tag": "CALL",
                     "observation_tag": "RES"},
        },
    }  # fmt: skip
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    # The reference: the same record read as sharegpt by data.path, with data.columns.tools.
    direct = SFTDataConfig(path=str(tmp_path / "plain.jsonl"), columns={"tools": "tl"})
    expected = load_conversations(direct, direct.paths())
    assert expected[0][1]["tool_calls"] and expected[0][2]["role"] == "tool"
    assert expected[0][0]["tools"] == tools
    for name in info:
        config = cfg(tmp_path, name)
        assert load_conversations(config, config.paths()) == expected, name


def test_num_samples_draws_every_sample_once_before_any_twice(data_dir, tok_dir):
    info = json.loads((data_dir / "dataset_info.json").read_text())
    info["few"] = {**info["sharegpt_plain"], "num_samples": 4}
    info["many"] = {**info["custom_tags"], "num_samples": 16}  # 7 samples over two files
    (data_dir / "dataset_info.json").write_text(json.dumps(info))
    cache = str(data_dir / "cache")
    few, _ = build_sft_datasets(cfg(data_dir, "few", cache_dir=cache), str(tok_dir), 64, 0)
    assert len(few) == 4 and len(set(few.refs[:, 1].tolist())) == 4
    many, _ = build_sft_datasets(cfg(data_dir, ["many"], cache_dir=cache), str(tok_dir), 64, 0)
    counts = np.zeros(len(CONVS), int)
    for file, sample in many.refs.tolist():
        counts[file * 3 + sample] += 1  # part-0 holds CONVS[:3]
    assert len(many) == 16 and counts.min() == 2 and counts.max() == 3


def test_ranking_datasets_give_the_pairs_of_the_same_records(tmp_path, tok_dir):
    pairs = [(f"q{i}", f"good {i}", f"bad {i}") for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", [{"ask": q, "win": c, "lose": r} for q, c, r in pairs])
    write_jsonl(
        tmp_path / "s.jsonl",
        [{"conversations": [{"from": "human", "value": q}],
          "chosen": {"from": "gpt", "value": c}, "rejected": {"from": "gpt", "value": r}}
         for q, c, r in pairs],
    )  # fmt: skip
    info = {
        "pairs_alpaca": {
            "file_name": "a.jsonl", "ranking": True,
            "columns": {"prompt": "ask", "chosen": "win", "rejected": "lose"},
        },
        "pairs_sharegpt": {
            "file_name": "s.jsonl", "ranking": True, "formatting": "sharegpt",
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        },
    }  # fmt: skip
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    write_jsonl(
        tmp_path / "ref.jsonl",
        [{"instruction": q, "chosen": c, "rejected": r} for q, c, r in pairs],
    )
    cache = str(tmp_path / "cache")
    ref, _ = build_pair_datasets(
        DPODataConfig(path=str(tmp_path / "ref.jsonl"), cache_dir=cache), str(tok_dir), 48, 0
    )
    for name in info:
        config = DPODataConfig(dataset_info=str(tmp_path), dataset=name, cache_dir=cache)
        got, _ = build_pair_datasets(config, str(tok_dir), 48, 0)
        assert len(got) == len(ref) == 5
        for i in range(5):
            assert np.array_equal(got[i]["tokens"].numpy(), ref[i]["tokens"].numpy()), name
    with pytest.raises(ConfigError, match=r"'pairs_alpaca' is a preference \(ranking\) .*dpo"):
        cfg(tmp_path, "pairs_alpaca")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"c": {"file_name": "ref.jsonl"}}))
    with pytest.raises(ConfigError, match="'c' is a conversation dataset; .*mtrain.sft"):
        DPODataConfig(dataset_info=str(tmp_path), dataset="c").validate()


def test_a_json_file_of_one_record_per_line_is_read(tmp_path):
    (tmp_path / "lines.json").write_text(
        "".join(json.dumps(chat(c, "sharegpt")) + "\n" for c in CONVS)
    )
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"d": {"file_name": "lines.json", "formatting": "sharegpt"}})
    )
    config = cfg(tmp_path, "d")
    assert load_conversations(config, config.paths()) == CONVS


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"hf_hub_url": "org/data"}, r"lives on a hub \(hf_hub_url='org/data'\).*file_name"),
        ({"file_name": "nope.json"}, r"file_name 'nope.json' is not in "),
        ({"file_name": "d.csv"}, r"d.csv is not a .json, .jsonl or .parquet file"),
        ({"file_name": "d.jsonl", "columns": {"kto_tag": "label"}}, r"is KTO data"),
        ({"file_name": "d.jsonl", "columns": {"images": "img"}}, r"text only"),
        ({"file_name": "d.jsonl", "formatting": "xml"}, r"formatting 'xml' is not"),
        ({"file_name": "d.jsonl", "num_samples": 0}, r"num_samples=0 must be a positive"),
        ({"file_name": "d.jsonl", "columns": {"tools": "t"}}, r"tools from sharegpt"),
    ],
)
def test_bad_descriptions_are_refused_naming_the_dataset(tmp_path, entry, message):
    (tmp_path / "d.jsonl").write_text("{}\n")
    (tmp_path / "d.csv").write_text("a,b\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"x": entry}))
    with pytest.raises(ConfigError, match=r"dataset_info.json: dataset 'x'.*" + message):
        cfg(tmp_path, "x")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"dataset": "zzz"}, r"data.dataset: 'zzz' is not described in .* \(it has: x\)"),
        ({"dataset": "x", "path": "a.jsonl"}, "give data.path or data.dataset, not both"),
        ({"dataset": "x", "format": "alpaca"}, "data.format does not apply to data.dataset"),
        ({"dataset": "x", "columns": {"input": "i"}}, "data.columns does not apply"),
        ({"dataset": "x", "val_dataset": "x", "val_ratio": 0.1}, "not two"),
        ({"dataset": " , "}, "data.dataset names no dataset"),
        ({"dataset_info": None, "dataset": "x"}, "set data.dataset_info="),
        ({"dataset": None}, "data.path is not set; give data.path=FILE"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(tmp_path, kw, message):
    (tmp_path / "d.jsonl").write_text("{}\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"x": {"file_name": "d.jsonl"}}))
    with pytest.raises(ConfigError, match=message):
        SFTDataConfig(**{"dataset_info": str(tmp_path), **kw}).validate()


def test_broken_dataset_info_names_its_line(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{\n  "a": {"file_name": "x.json",}\n}\n')
    with pytest.raises(ConfigError, match=r"dataset_info.json:2: not valid JSON"):
        cfg(tmp_path, "a")
    with pytest.raises(ConfigError, match=r"data.dataset_info: .*missing.json does not exist"):
        cfg(tmp_path / "missing.json", "a")


def test_sft_cli_trains_from_a_dataset_info_directory(data_dir, tmp_path, tiny_hf):
    """The user's view: `mtrain.sft data.dataset_info=DIR data.dataset=a,b` (LLaMA-Factory's
    comma list, which Hydra alone would take for a sweep) trains a couple of steps."""
    import subprocess

    metrics = tmp_path / "metrics.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "mtrain.sft", "+model=qwen3_tiny", f"model.hf_dir={tiny_hf()}",
         f"load={tiny_hf()}", "device=cpu", "parallel.tp=1", "parallel.pp=1", "train.iters=2", "train.seq_length=64",
         "train.global_batch_size=2", "train.precision=fp32", f"log.metrics_file={metrics}",
         f"data.dataset_info={data_dir}", "data.dataset=alpaca_renamed,custom_tags",
         f"data.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = run.stderr + run.stdout
    assert run.returncode == 0, out[-3000:]
    assert "alpaca.json: alpaca, 7 conversations" in out
    assert "part-1.jsonl: sharegpt, 4 conversations" in out
    assert len(metrics.read_text().splitlines()) == 2


def test_val_dataset_is_the_validation_set(data_dir, tok_dir):
    config = cfg(
        data_dir, "alpaca_renamed", val_dataset="custom_tags", cache_dir=str(data_dir / "c")
    )
    assert config.val_paths() == [str(data_dir / "custom" / f"part-{i}.jsonl") for i in (0, 1)]
    train, val = build_sft_datasets(config, str(tok_dir), 64, 0)
    assert (train.stats["samples"], val.stats["samples"]) == (len(CONVS), len(CONVS))
