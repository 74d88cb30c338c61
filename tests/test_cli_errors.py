"""Hydra's own refusals at the command line: one `error: ...` line that names the override and
what it accepts, exit code 2 (like mtrain's own errors), and Hydra unchanged for valid input.

The table runs each command in-process (`main()` with `sys.argv`, as `python -m` does); the
subprocess tests check the same at the process boundary: the exit status and no traceback.
"""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys

import pytest

from mtrain.errors import ConfigError, exit_on_user_error

PRESETS = "qwen3_0_6b, qwen3_14b, qwen3_1_7b, qwen3_235b_a22b, qwen3_30b_a3b, qwen3_32b, qwen3_4b, qwen3_8b, qwen3_moe_tiny, qwen3_tiny"
PT = ("mtrain.pt", "+model=qwen3_tiny", "dry_run=true", "train.iters=1", "data.path=x")

CASES = {
    "type-of-a-command-key": (
        ("converters.hf2mcore", "hf_dir=x", "out_dir=y", "tp=abc"),
        "error: tp=abc: expected an integer",
    ),
    "type-of-a-training-key": (
        ("mtrain.pt", "+model=qwen3_tiny", "dry_run=true", "data.path=x", "train.iters=abc"),
        "error: train.iters=abc: expected an integer or null",
    ),
    "type-in-a-nested-group": ((*PT, "lora.r=x"), "error: lora.r=x: expected an integer"),
    "float-for-an-integer": (
        (*PT, "parallel.tp=1.5"),
        "error: parallel.tp=1.5: expected an integer or null",
    ),
    "list-for-a-scalar": (
        (*PT, "train.seq_length=[1,2]"),
        "error: train.seq_length=[1,2]: expected an integer",
    ),
    "scalar-for-a-list": (
        (*PT, "freeze.trainable=abc"),
        "error: freeze.trainable=abc: expected a list of strings, e.g. freeze.trainable=[a,b]",
    ),
    "not-a-bool": ((*PT, "dry_run=maybe"), "error: dry_run=maybe: expected true or false"),
    "unknown-preset": (
        ("mtrain.pt", "+model=qwen3_tinyy", "dry_run=true", "train.iters=1", "data.path=x"),
        f"error: +model=qwen3_tinyy: no preset 'qwen3_tinyy' in conf/model/; choose one of "
        f"{PRESETS} (did you mean qwen3_tiny?)",
    ),
    "no-model-at-all": (
        ("mtrain.pt", "dry_run=true", "train.iters=1", "data.path=x"),
        "error: no model given: pass model.hf_dir=HF_DIR (its config.json describes the model) "
        f"or a preset, +model=<{PRESETS.replace(', ', '|')}>",
    ),
    "hf-dir-that-is-no-model": (
        ("mtrain.pt", "model.hf_dir=/x", "dry_run=true", "train.iters=1", "data.path=x"),
        "error: /x/config.json not found; hf_dir must be a Hugging Face model directory",
    ),
    "group-without-plus": (
        ("mtrain.pt", "model=qwen3_tiny", "dry_run=true", "train.iters=1", "data.path=x"),
        "error: Could not override 'model'. No match in the defaults list. "
        "To append to your default list use +model=qwen3_tiny",
    ),
    "override-syntax": (
        (*PT, "train.lr=1=2"),
        "error: cannot parse the override 'train.lr=1=2': mismatched input '=' expecting <EOF>",
    ),
    "sweep-without-multirun": (
        (*PT, "train.lr=1e-3,1e-4"),
        "error: Ambiguous value for argument 'train.lr=1e-3,1e-4'",
    ),
    "unresolved-interpolation": (
        (*PT, "train.lr=${nope}"),
        "error: train.lr: Interpolation key 'nope' not found",
    ),
    "bad-value-in-a-multirun-sweep": (
        ("mtrain.pt", "--multirun", *PT[1:], "train.seq_length=64,abc"),
        "error: train.seq_length=abc: expected an integer",
    ),
}


def run_in_process(monkeypatch, capsys, module: str, *args: str) -> tuple[int, str, str]:
    """`python -m module args...` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [module, *args])
    monkeypatch.delenv("MTRAIN_ERROR_FILE", raising=False)
    monkeypatch.setattr(logging, "shutdown", lambda: None)  # keep pytest's log handlers open
    # A command that gets as far as mtrain.log.setup() points mtrain's loggers at this test's
    # captured stderr; give later tests (caplog) the loggers as they were.
    loggers = [logging.getLogger(name) for name in ("mtrain", "converters")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    try:
        importlib.import_module(module).main()
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, saved):
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.mark.parametrize("argv, message", CASES.values(), ids=CASES.keys())
def test_hydra_refusals_are_one_line_naming_the_override_with_exit_code_2(
    monkeypatch, capsys, tmp_path, argv, message
):
    monkeypatch.chdir(tmp_path)  # a multirun that got through would write multirun/ here
    code, out, err = run_in_process(monkeypatch, capsys, *argv)
    assert code == 2, err
    assert one_error_line(err).startswith(message), err
    assert out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, key",
    [
        (("converters.hf2mcore", "hf_dir=x", "out_dir=y", "tp=abc"), "tp=abc"),
        (("mtrain.pt", "+model=qwen3_tinyy", "dry_run=true", "data.path=x"), "+model=qwen3_tinyy"),
    ],
    ids=["hf2mcore-type", "pt-preset"],
)
def test_a_hydra_refusal_ends_the_process_with_exit_code_2_and_no_traceback(tmp_path, argv, key):
    proc = subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert key in one_error_line(proc.stderr)
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr


# --- valid input: Hydra's own behaviour -------------------------------------------------------


def test_help_still_shows_the_config_groups_and_keys(monkeypatch, capsys):
    code, out, _ = run_in_process(monkeypatch, capsys, "mtrain.pt", "--help")
    assert code == 0 and "model: qwen3_0_6b, qwen3_14b" in out and "seq_length: 2048" in out


def test_cfg_job_still_prints_the_composed_config(monkeypatch, capsys):
    code, out, err = run_in_process(
        monkeypatch, capsys, "mtrain.pt", "+model=qwen3_tiny", "train.iters=7", "--cfg", "job"
    )
    assert code == 0, err
    assert "name: qwen3_tiny" in out and "iters: 7" in out


def test_multirun_still_runs_every_value_of_a_sweep(tmp_path):
    argv = ["mtrain.pt", "dry_run=true", "train.iters=1", "train.seq_length=64", "data.path=x"]
    proc = subprocess.run(
        [sys.executable, "-m", *argv, "+model=qwen3_tiny,qwen3_0_6b", "--multirun"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "model      qwen3_tiny:" in proc.stdout and "model      qwen3_0_6b:" in proc.stdout


# --- the launcher's error file ----------------------------------------------------------------


def test_the_first_error_reported_is_the_one_in_the_launchers_error_file(
    monkeypatch, capsys, tmp_path
):
    """Every worker of a launched run reports; scripts/train.sh shows the first line written."""
    error_file = tmp_path / "error"
    monkeypatch.setenv("MTRAIN_ERROR_FILE", str(error_file))
    monkeypatch.setattr(logging, "shutdown", lambda: None)

    @exit_on_user_error
    def refuse(message: str):
        raise ConfigError(message)

    for message in ("train.iters=0 must be positive", "another rank's\nmulti-line error"):
        with pytest.raises(SystemExit) as exit:
            refuse(message)
        assert exit.value.code == 2
    assert error_file.read_text() == "error: train.iters=0 must be positive\n"
    assert capsys.readouterr().err.splitlines() == [
        "error: train.iters=0 must be positive",
        "error: another rank's multi-line error",
    ]
