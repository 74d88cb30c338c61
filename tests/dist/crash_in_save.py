"""Worker: `python -m mtrain.pt` whose second checkpoint save dies half-way through a file.

    python tests/dist/crash_in_save.py <mtrain.pt overrides...>
"""

import os
import sys

import mtrain.checkpoint.training as checkpoint
from mtrain import pt

calls = []
real_save = checkpoint.save_rank_file


def save_then_die(path, payload):
    calls.append(path)
    if len(calls) == 2:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"PK\x03\x04 half a file")  # a torn zip, as a killed writer leaves
        os._exit(9)
    real_save(path, payload)


checkpoint.save_rank_file = save_then_die
sys.argv = ["mtrain.pt", *sys.argv[1:]]
pt.main()
