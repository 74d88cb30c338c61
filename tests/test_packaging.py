"""A wheel (non-editable `pip install .`) carries the Hydra config tree the commands read."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_holds_every_config_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("mtrain-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"share/mtrain/conf/{p.relative_to(ROOT / 'conf').as_posix()}"
        for p in (ROOT / "conf").rglob("*.yaml")
    }
    shipped = {n.split(".data/data/", 1)[1] for n in names if ".data/data/share/" in n}
    assert expected and expected == shipped
    assert any(n.endswith("mtrain/config/__init__.py") for n in names)
