"""KTO data: unpaired labelled records -> rows of the sample and of its mismatched twin.

References: the tokenizer's own `apply_chat_template` for the sample's tokens and for the twin
(its prompt with the previous sample's completion rendered as one conversation), the record's
label, and the response strings for what the loss masks cover. Exact comparisons.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtrain.config.dpo_data import DPODataConfig
from mtrain.data.kto import build_kto_datasets
from mtrain.errors import DataError

RECORDS = [
    {"prompt": "first question", "completion": "a fine answer", "label": True},
    {"prompt": [{"role": "user", "content": "second one"}],
     "completion": [{"role": "assistant", "content": "not good"}], "label": False},
    {"prompt": "third", "completion": {"role": "assistant", "content": "yes indeed"},
     "label": True, "system": "Be brief."},
]  # fmt: skip


def write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def conversation(record: dict, completion: str | None = None) -> list[dict]:
    prompt = record["prompt"]
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    system = [{"role": "system", "content": record["system"]}] if "system" in record else []
    answer = record["completion"] if completion is None else completion
    if isinstance(answer, list):
        answer = answer[-1]
    if isinstance(answer, dict):
        answer = answer["content"]
    return [*system, *turns, {"role": "assistant", "content": answer}]


def test_rows_are_the_sample_and_its_twin_with_the_previous_completion(tmp_path, tok, tok_dir):
    config = DPODataConfig(path=str(write(tmp_path / "k.jsonl", RECORDS)),
                           cache_dir=str(tmp_path / "cache"))  # fmt: skip
    seq = 80
    train, val = build_kto_datasets(config, str(tok_dir), seq, seed=0)
    assert val is None and len(train) == 3
    seen = set()
    for i in range(3):
        item = train[i]
        r = int(item["pair"])
        seen.add(r)
        assert item["label"].item() == float(RECORDS[r]["label"])
        previous = conversation(RECORDS[(r - 1) % 3])[-1]["content"]
        for row, messages in enumerate(
            [conversation(RECORDS[r]), conversation(RECORDS[r], previous)]
        ):
            want = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
            assert item["tokens"][row, : len(want)].tolist() == want
            assert (item["tokens"][row, len(want) :] == tok.pad_token_id).all()
            trained = item["labels"][row][item["loss_mask"][row] == 1].tolist()
            assert tok.decode(trained) == messages[-1]["content"] + "<|im_end|>"
    assert seen == {0, 1, 2}


def test_validation_split_holds_out_samples_with_their_labels(tmp_path, tok_dir):
    records = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 3 == 0} for i in range(20)]
    config = DPODataConfig(path=str(write(tmp_path / "k.jsonl", records)), val_ratio=0.25,
                           cache_dir=str(tmp_path / "cache"))  # fmt: skip
    train, val = build_kto_datasets(config, str(tok_dir), 48, seed=0)
    assert (len(train), len(val)) == (15, 5)
    assert sum(train.label) + sum(val.label) == sum(r["label"] for r in records)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "q", "completion": "a"}, "no field 'label'"),
        ({"prompt": "q", "completion": "a", "label": "yes"}, "must be true or false"),
        ({"prompt": "q", "completion": "", "label": True}, "is empty"),
    ],
)
def test_malformed_record_names_file_and_line(tmp_path, tok_dir, record, message):
    path = write(tmp_path / "k.jsonl", [RECORDS[0], record])
    config = DPODataConfig(path=str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=rf"k.jsonl:2: .*{message}"):
        build_kto_datasets(config, str(tok_dir), 48, seed=0)


def test_columns_rename_kto_fields(tmp_path, tok_dir):
    records = [{"q": "x", "a": "y", "ok": True}, {"q": "z", "a": "w", "ok": False}]
    config = DPODataConfig(path=str(write(tmp_path / "k.jsonl", records)),
                           columns={"prompt": "q", "completion": "a", "label": "ok"},
                           cache_dir=str(tmp_path / "cache"))  # fmt: skip
    train, _ = build_kto_datasets(config, str(tok_dir), 48, seed=0)
    assert sorted(train.label.tolist()) == [False, True]
