"""DPO data: preference records -> (chosen, rejected) token rows with loss masks on the response.

References are independent of the code under test: the tokenizer's own `apply_chat_template`
(with and without the generation prompt) for tokens and the prompt/response boundary, response
strings written by hand for what the loss mask covers, and plain counting for the dataset's
bookkeeping. Every comparison is exact (token ids, masks, counts).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrain.config.dpo_data import DPODataConfig
from mtrain.config.sft_data import SFTDataConfig
from mtrain.data import sft_cache, sft_encode
from mtrain.data.pairs import build_pair_datasets
from mtrain.data.sft import build_sft_datasets
from mtrain.errors import ConfigError, DataError

SYSTEM, Q1, A1, Q2 = "You are terse.", "hello there", "the quick brown fox", "one more"
CHOSEN, REJECTED = "lazy dog jumps", "no idea"
PROMPT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": Q1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": Q2},
]
TRL_PROMPT = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]
TRL_PROMPT += [{"role": "user", "content": Q2}]
LAYOUTS = {  # (record, the prompt it holds)
    "alpaca": (
        {"system": SYSTEM, "history": [[Q1, A1]], "instruction": Q2, "chosen": CHOSEN,
         "rejected": REJECTED},
        PROMPT,
    ),
    "alpaca_input": (
        {"instruction": "Sum", "input": "1 2", "chosen": CHOSEN, "rejected": REJECTED},
        [{"role": "user", "content": "Sum\n1 2"}],
    ),
    "sharegpt": (
        {"system": SYSTEM,
         "conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1},
                           {"from": "human", "value": Q2}],
         "chosen": CHOSEN, "rejected": {"from": "gpt", "value": REJECTED}},
        PROMPT,
    ),
    "openai_messages": (
        {"messages": PROMPT, "chosen": {"role": "assistant", "content": CHOSEN},
         "rejected": REJECTED},
        PROMPT,
    ),
    "openai_prompt_string": (
        {"prompt": Q2, "chosen": CHOSEN, "rejected": REJECTED},
        [{"role": "user", "content": Q2}],
    ),
    "trl_lists": (  # TRL's conversational form: a bare response, and one repeating the prompt
        {"prompt": TRL_PROMPT, "chosen": [{"role": "assistant", "content": CHOSEN}],
         "rejected": [*TRL_PROMPT, {"role": "assistant", "content": REJECTED}]},
        TRL_PROMPT,
    ),
}  # fmt: skip
KEYS = {"tokens", "labels", "loss_mask", "position_ids", "pair"}


def write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cfg(tmp_path: Path, path, **kw) -> DPODataConfig:
    paths = [str(p) for p in path] if isinstance(path, list) else str(path)
    return DPODataConfig(path=paths, cache_dir=str(tmp_path / "cache"), **kw)


def reference(tok, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    return tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )


def masked_text(tok, item: dict, row: int) -> str:
    """The label tokens the loss is taken on, decoded."""
    return tok.decode(item["labels"][row][item["loss_mask"][row] == 1].tolist())


def simple_pairs(n: int, start: int = 0) -> list[dict]:
    return [
        {"instruction": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
        for i in range(start, start + n)
    ]


# --- layouts, tokens, masks -----------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_tokenizes_as_the_chat_template(tmp_path, tok, tok_dir, layout):
    record, prompt = LAYOUTS[layout]
    seq = 96
    train, val = build_pair_datasets(
        cfg(tmp_path, write(tmp_path / "d.jsonl", [record] * 3)), str(tok_dir), seq, seed=0
    )
    assert val is None and len(train) == train.num_pairs == 3
    item = train[0]
    assert set(item) == KEYS
    assert all(item[k].shape == (2, seq) for k in KEYS - {"pair"})
    assert item["pair"].shape == () and item["pair"].dtype == torch.int64
    assert [item[k].dtype for k in ("tokens", "labels", "loss_mask", "position_ids")] == [
        torch.int64, torch.int64, torch.float32, torch.int64,
    ]  # fmt: skip
    prompt_ids = reference(tok, prompt, generation_prompt=True)
    for row, response in enumerate([CHOSEN, REJECTED]):
        expected = reference(tok, [*prompt, {"role": "assistant", "content": response}])
        n = len(expected)
        assert item["tokens"][row, :n].tolist() == expected
        assert (item["tokens"][row, n:] == tok.pad_token_id).all()
        assert item["position_ids"][row, :n].tolist() == list(range(n))
        assert torch.equal(item["loss_mask"][row], (item["labels"][row] != -100).float())
        # Labels are next-token targets: trained from the last prompt position on, and they
        # spell exactly the response and its end-of-turn token (not the "\n" after it).
        assert masked_text(tok, item, row) == response + "<|im_end|>"
        assert int(item["loss_mask"][row].nonzero().min()) == len(prompt_ids) - 1
        assert item["tokens"][row, : len(prompt_ids)].tolist() == prompt_ids
    assert torch.equal(  # both rows share the prompt, and differ right after it
        item["tokens"][0, : len(prompt_ids)], item["tokens"][1, : len(prompt_ids)]
    )
    assert item["tokens"][0, len(prompt_ids)] != item["tokens"][1, len(prompt_ids)]


def test_rows_equal_sfts_padded_samples_of_the_same_conversations(tmp_path, tok_dir):
    record, prompt = LAYOUTS["openai_messages"]
    pairs, _ = build_pair_datasets(
        cfg(tmp_path, write(tmp_path / "p.jsonl", [record])), str(tok_dir), 64, 0
    )
    convs = [[*prompt, {"role": "assistant", "content": r}] for r in (CHOSEN, REJECTED)]
    sft_cfg = SFTDataConfig(
        path=str(write(tmp_path / "s.jsonl", [{"messages": c} for c in convs])),
        train_on="last", cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    sft, _ = build_sft_datasets(sft_cfg, str(tok_dir), 64, 0)
    by_tokens = {tuple(sft[i]["tokens"].tolist()): sft[i] for i in range(len(sft))}
    item = pairs[0]
    for row in range(2):
        sample = by_tokens[tuple(item["tokens"][row].tolist())]
        for key in KEYS - {"pair"}:
            assert torch.equal(item[key][row], sample[key]), key


def test_columns_rename_pair_fields(tmp_path, tok, tok_dir):
    record = {"question": Q2, "good": CHOSEN, "bad": REJECTED}
    renames = {"instruction": "question", "chosen": "good", "rejected": "bad"}
    config = cfg(tmp_path, write(tmp_path / "d.jsonl", [record]), columns=renames)
    train, _ = build_pair_datasets(config, str(tok_dir), 64, 0)
    user = [{"role": "user", "content": Q2}]
    assert masked_text(tok, train[0], 1) == REJECTED + "<|im_end|>"
    n = len(reference(tok, [*user, {"role": "assistant", "content": CHOSEN}]))
    assert train[0]["tokens"][0, :n].tolist() == reference(
        tok, [*user, {"role": "assistant", "content": CHOSEN}]
    )
    turns = [{"speaker": "human", "text": Q2}]
    chat = {"dialog": turns, "yes": {"speaker": "gpt", "text": CHOSEN}, "no": REJECTED}
    renames = {"conversations": "dialog", "role": "speaker", "content": "text"}
    renames |= {"chosen": "yes", "rejected": "no"}
    config = cfg(tmp_path, write(tmp_path / "c.jsonl", [chat]), format="sharegpt", columns=renames)
    train, _ = build_pair_datasets(config, str(tok_dir), 64, 0)
    assert masked_text(tok, train[0], 0) == CHOSEN + "<|im_end|>"


# --- malformed records ----------------------------------------------------------------------------

GOOD = {
    "alpaca": LAYOUTS["alpaca"][0],
    "sharegpt": LAYOUTS["sharegpt"][0],
    "openai": LAYOUTS["openai_messages"][0],
}
BAD = [  # (layout of the file, bad record, error)
    ("alpaca", "{not json", "not valid JSON"),
    ("alpaca", '{"instruction": "q", "chosen": "a"}', "no field 'rejected'"),
    ("alpaca", '{"instruction": "q", "chosen": " \\n", "rejected": "b"}',
     "chosen response .* empty"),
    ("alpaca", '{"text": "q", "chosen": "a", "rejected": "b"}', "no field 'instruction'"),
    ("openai", '{"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}',
     "'chosen' is a user message, not an assistant response"),
    ("openai", '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
     '"content": "a"}], "chosen": "x", "rejected": "y"}',
     "prompt ends with a assistant turn, not a user turn"),
    ("openai", '{"messages": [], "chosen": "x", "rejected": "y"}', "the prompt is empty"),
    ("openai", '{"chosen": "x", "rejected": "y"}', "no prompt field 'messages' or 'prompt'"),
    ("openai", '{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", '
     '"content": "other"}, {"role": "assistant", "content": "a"}], "rejected": "b"}',
     "'chosen' repeats a prompt that differs"),
    ("openai", '{"prompt": "q", "chosen": "a", "rejected": []}', "'rejected' needs fields"),
    ("sharegpt", '{"conversations": [{"from": "human", "value": "q"}], "chosen": "a", '
     '"rejected": {"from": "gpt"}}', "needs fields 'from' and 'value'"),
    ("sharegpt", '{"conversations": [{"from": "gpt", "value": "q"}, {"from": "human", '
     '"value": "q"}], "chosen": "a", "rejected": "b"}', "starts with a assistant turn"),
]  # fmt: skip


@pytest.mark.parametrize("fmt, line, message", BAD, ids=[m[:24] for _, _, m in BAD])
def test_malformed_record_names_file_and_line(tmp_path, tok_dir, fmt, line, message):
    good = json.dumps(GOOD[fmt])
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError, match=rf"train\.jsonl:4: .*{message}"):
        build_pair_datasets(cfg(tmp_path, path), str(tok_dir), 64, 0)


def test_skip_bad_counts_and_reports_in_one_line(tmp_path, tok_dir, caplog):
    lines = [json.dumps(GOOD["openai"])] * 5
    lines[1], lines[3] = "{oops", '{"prompt": "q", "chosen": "", "rejected": "b"}'
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO, logger="mtrain.data"):
        train, _ = build_pair_datasets(cfg(tmp_path, path, skip_bad=True), str(tok_dir), 64, 0)
    assert train.stats["pairs"] == 3
    reports = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(reports) == 1 and "skipped 2 malformed record(s)" in reports[0]
    assert "train.jsonl:2:" in reports[0] and "3 pairs" in reports[0]


def test_a_pair_with_one_untokenizable_side_is_one_bad_record(tmp_path, tok, tok_dir):
    """A header ending in a space that BPE merges into the response's first word: that side
    cannot be masked faithfully, so its pair goes, counted once however many sides fail."""
    spaced = tok.__class__.from_pretrained(str(tok_dir))
    spaced.chat_template = (
        "{% for m in messages %}{{ m.role + ': ' + m.content + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    spaced.save_pretrained(str(tmp_path / "tok_spaced"))
    records = [
        {"prompt": "q", "chosen": "!", "rejected": "?"},
        {"prompt": "q", "chosen": "!", "rejected": "hello"},
        {"prompt": "q", "chosen": "hello", "rejected": "hello"},
    ]
    path = write(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=r"d\.jsonl:2: a token spans the boundary"):
        build_pair_datasets(cfg(tmp_path, path), str(tmp_path / "tok_spaced"), 32, 0)
    config = cfg(tmp_path, path, skip_bad=True)
    train, _ = build_pair_datasets(config, str(tmp_path / "tok_spaced"), 32, 0)
    assert train.stats["pairs"] == 1
    assert train.files[0].meta["bad"] == 2 and train.files[0].meta["samples"] == 2


# --- datasets -------------------------------------------------------------------------------------


def test_truncation_right_keeps_the_beginning_and_drop_drops(tmp_path, tok, tok_dir):
    long_answer = " fox" * 100
    records = [
        {"instruction": "a", "chosen": "b", "rejected": "c"},
        {"instruction": "a b", "chosen": long_answer, "rejected": "short"},
        {"instruction": " fox" * 100, "chosen": "b", "rejected": "c"},  # prompt over seq_length
    ]
    path = write(tmp_path / "d.jsonl", records)
    seq = 48
    right, _ = build_pair_datasets(cfg(tmp_path, path, truncation="right"), str(tok_dir), seq, 0)
    assert right.stats | {"tokens": 0, "padding": 0} == {
        "pairs": 2, "tokens": 0, "padding": 0, "truncated": 1, "dropped_long": 0,
        "dropped_untrained": 1,
    }  # fmt: skip
    assert "truncated 1 over-long pair(s)" in right.describe("train")
    user = [{"role": "user", "content": "a b"}]
    full = reference(tok, [*user, {"role": "assistant", "content": long_answer}])
    short = reference(tok, [*user, {"role": "assistant", "content": "short"}])
    items = [right[i] for i in range(len(right))]
    (item,) = [it for it in items if it["tokens"][0].tolist() == full[:seq]]
    assert item["tokens"][1, : len(short)].tolist() == short
    assert item["loss_mask"][0, -1] == 0  # the cut sequence's last position has no target
    drop, _ = build_pair_datasets(cfg(tmp_path, path, truncation="drop"), str(tok_dir), seq, 0)
    assert (drop.stats["pairs"], drop.stats["dropped_long"], drop.stats["truncated"]) == (1, 2, 0)
    kept = reference(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert drop[0]["tokens"][0, : len(kept)].tolist() == kept


def test_pair_indices_are_a_stable_permutation(tmp_path, tok_dir):
    path = write(tmp_path / "d.jsonl", simple_pairs(40))
    by_pair = {}
    for seed in (0, 1):
        train, _ = build_pair_datasets(cfg(tmp_path, path), str(tok_dir), 32, seed)
        pairs = [int(train[i]["pair"]) for i in range(len(train))]
        assert sorted(pairs) == list(range(len(train)))
        by_pair[seed] = {pairs[i]: train[i]["tokens"].tolist() for i in range(len(train))}
        if seed == 0:
            assert pairs != sorted(pairs)  # shuffled
    assert by_pair[0] == by_pair[1]  # the same index names the same pair whatever the order


def test_validation_split_is_deterministic_and_disjoint(tmp_path, tok, tok_dir):
    path = write(tmp_path / "d.jsonl", simple_pairs(50))

    def chosen(ds) -> set:
        return {masked_text(tok, ds[i], 0) for i in range(len(ds))}

    config = cfg(tmp_path, path, val_ratio=0.2)
    train, val = build_pair_datasets(config, str(tok_dir), 32, seed=0)
    assert (len(train), len(val)) == (40, 10)
    assert not chosen(train) & chosen(val)
    assert len(chosen(train) | chosen(val)) == 50
    _, again = build_pair_datasets(config, str(tok_dir), 32, seed=7)  # train.seed: same split
    assert chosen(again) == chosen(val)
    vpath = write(tmp_path / "v.jsonl", simple_pairs(7, start=100))
    train, val = build_pair_datasets(cfg(tmp_path, path, val_path=str(vpath)), str(tok_dir), 32, 0)
    assert (len(train), len(val)) == (50, 7)


def test_weights_blend_files_in_proportion(tmp_path, tok_dir):
    a = write(tmp_path / "a.jsonl", simple_pairs(40))
    b = write(tmp_path / "b.jsonl", simple_pairs(60, start=40))
    config = cfg(tmp_path, [a, b], weights=[3, 1])
    train, _ = build_pair_datasets(config, str(tok_dir), 32, seed=0)
    assert np.bincount(train.refs[:, 0], minlength=2).tolist() == [75, 25]  # 100 draws


def test_pairs_are_cached_apart_from_sft(tmp_path, tok_dir, monkeypatch):
    """A record readable both as SFT (instruction/output) and as a pair gets two entries."""
    record = {"instruction": "q", "output": "o", "chosen": "a", "rejected": "b"}
    path = write(tmp_path / "d.jsonl", [record] * 4)
    sft_cfg = SFTDataConfig(path=str(path), cache_dir=str(tmp_path / "cache"))
    build_sft_datasets(sft_cfg, str(tok_dir), 32, 0)
    train, _ = build_pair_datasets(cfg(tmp_path, path), str(tok_dir), 32, 0)
    assert len(train) == 4 and train.files[0].meta["samples"] == 8
    names = sorted(p.name.split("-")[1] for p in (tmp_path / "cache").glob("d-*.json"))
    assert names == ["pairs", "sft"]

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized although cached")

    monkeypatch.setattr(sft_cache, "_write", refuse)
    again, _ = build_pair_datasets(cfg(tmp_path, path, truncation="drop"), str(tok_dir), 32, 1)

    def by_pair(ds) -> dict:
        return {int(ds[i]["pair"]): ds[i]["tokens"].tolist() for i in range(len(ds))}

    assert by_pair(again) == by_pair(train)


def test_workers_write_the_serial_pairs_cache_byte_for_byte(
    tmp_path, spaced_tok_dir, monkeypatch, cache_contents
):
    """Two worker processes, batches of 4 pairs, with unparsable records and pairs a side of
    which has a token across the turn boundary: the same entry, the same bytes, the same
    counts (a pair refused once however many sides fail)."""
    monkeypatch.setattr(sft_encode, "WORKER_BATCH", 4)
    lines = [
        json.dumps({"prompt": f"q{i}", "chosen": "!" * (1 + i % 3), "rejected": "?" + "!" * i})
        for i in range(30)
    ]
    one_side, both = {"chosen": "!", "rejected": "hello"}, {"chosen": "hello", "rejected": "word"}
    for i in (3, 10, 11, 25):  # sides starting with a word, which the header's space joins
        lines[i] = json.dumps({"prompt": "q", **(one_side if i % 2 else both)})
    lines[17:17] = ["{broken"]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    caches = {}
    for workers in (1, 2):
        config = DPODataConfig(
            path=str(path), cache_dir=str(tmp_path / f"c{workers}"), skip_bad=True, workers=workers
        )
        train, _ = build_pair_datasets(config, str(spaced_tok_dir), 64, 0)
        caches[workers] = cache_contents(tmp_path / f"c{workers}")
        assert train.stats["pairs"] == 26 and train.files[0].meta["bad"] == 5
    assert caches[2] == caches[1]


def test_empty_set_is_refused(tmp_path, tok_dir):
    path = write(
        tmp_path / "d.jsonl", [{"instruction": " fox" * 100, "chosen": "a", "rejected": "b"}]
    )
    with pytest.raises(DataError, match="the train set has no pairs left within seq_length=16"):
        build_pair_datasets(cfg(tmp_path, path), str(tok_dir), 16, 0)


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"packing": True}, "data.packing is not supported for DPO"),
        ({"train_on": "assistant"}, "data.train_on=assistant is not supported for DPO.*final"),
        ({"train_on": "all"}, "data.train_on=all"),
        ({"format": "csv"}, "data.format=csv is not one of"),
        ({"columns": {"answer": "a"}}, "data.columns.answer is not a renamable field"),
        ({"workers": 0}, "data.workers=0 must be >= 1"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(tmp_path, tok_dir, changes, message):
    config = DPODataConfig(path="unused.jsonl", **changes)
    with pytest.raises(ConfigError, match=message):
        config.validate()
    with pytest.raises(ConfigError, match=message):
        build_pair_datasets(config, str(tok_dir), 32, 0)


def test_pair_columns_are_renamable_only_for_dpo():
    for name in ("chosen", "rejected", "prompt", "conversations"):
        DPODataConfig(path="a.jsonl", columns={name: "x"}).validate()
        with pytest.raises(ConfigError, match=f"data.columns.{name} is not a renamable"):
            SFTDataConfig(path="a.jsonl", columns={name: "x"}).validate()
