"""The README's configuration reference is generated from the structured configs and current."""

from __future__ import annotations

from mtrain.config import reference


def test_readme_reference_matches_the_configs():
    current = reference.readme_section(reference.README.read_text())
    assert current == reference.markdown(), (
        "README.md's configuration reference is stale: run "
        "`python -m mtrain.config.reference --write`"
    )


def test_every_key_of_every_command_has_a_comment():
    undocumented = []
    for command in reference.TRAINING + reference.TOOLS:
        for key, (_, _, doc) in reference.rows(*reference.effective(*command)).items():
            if not doc:
                undocumented.append(f"{command[0]}: {key}")
    assert not undocumented, undocumented


def test_effective_defaults_include_the_commands_yaml():
    sft = reference.rows(*reference.effective("mtrain.sft", "SFTConfig", "sft"))
    dpo = reference.rows(*reference.effective("mtrain.dpo", "DPOConfig", "dpo"))
    assert sft["train.lr"][1] == "1e-05" and dpo["train.lr"][1] == "5e-07"
    assert dpo["data.train_on"][1] == "last" and "dpo.beta" not in sft
