"""Config schemas. `CONF_DIR` is the Hydra config tree: the checkout's `conf/` (editable
installs, a source tree), else the copy a wheel installs under `<prefix>/share/mtrain/conf`."""

from __future__ import annotations

import sys
from pathlib import Path


def _conf_dir() -> Path:
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "mtrain" / "conf"


CONF_DIR = _conf_dir()
