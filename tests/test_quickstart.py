"""The README's "run it" command: scripts/quickstart.sh end to end on CPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.torchrun import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_runs_hf_to_sft_to_dpo_to_hf_and_answers(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "quickstart.sh"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "quickstart done" in proc.stdout
    for name in ("parity.json", "dpo_merged.json", "dpo_peft.json"):
        result = json.loads((out / name).read_text())
        assert result["ok"] and result["max_abs_diff"] < 1e-5, (name, result)
    answers = [line for line in proc.stdout.splitlines() if "->  model:" in line]
    assert len(answers) == 6  # three prompts after SFT, three after DPO
    assert "user: reverse: ab  ->  model: ba" in answers[-3]
    dpo = [json.loads(line) for line in (out / "dpo_metrics.jsonl").read_text().splitlines()]
    assert dpo[-1]["rewards/margin"] > dpo[0]["rewards/margin"]
    assert (out / "hf_dpo" / "config.json").is_file()
    assert (out / "peft_dpo" / "adapter_config.json").is_file()
