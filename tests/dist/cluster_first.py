"""Worker: who runs a cache-filling step under `parallel.cluster_first`, with a cache directory
shared by the nodes, one per node, and a step that fails on rank 0.

    torchrun --nnodes 2 --node_rank R --nproc_per_node 2 ... tests/dist/cluster_first.py OUT_DIR
"""

import json
import os
import sys
import time
from pathlib import Path

from mtrain import accel, parallel
from mtrain.errors import DataError

out = Path(sys.argv[1])
accel.activate("cpu")
parallel.init_process_group()
rank, node = parallel.global_rank(), int(os.environ["GROUP_RANK"])


def fill(cache: Path) -> str:
    """A read that fills the cache on a miss, slowly enough for a reader racing it to miss too."""
    if (cache / "entry").is_file():
        return "read"
    time.sleep(0.5)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "entry").write_text(str(rank))
    return "filled"


def fail() -> str:
    if rank == 0:
        raise DataError("d.jsonl:3: not valid JSON")
    return "ran"


results = {
    "shared": parallel.cluster_first(lambda: fill(out / "shared")),
    "local": parallel.cluster_first(lambda: fill(out / f"node{node}")),
}
try:
    results["failing"] = parallel.cluster_first(fail)
except DataError as err:
    results["failing"] = f"DataError: {err}"
(out / f"rank{rank}.json").write_text(json.dumps(results))
