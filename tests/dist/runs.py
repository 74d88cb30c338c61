"""Worker: several training runs in one set of CPU processes, each through the shared trainer
as `python -m mtrain.pt` / `sft` / `dpo` / `rm` would run it (one torchrun for many runs:
starting processes is the slow part on CPU).

    torchrun --nproc_per_node 4 tests/dist/runs.py RUNS.json RESULT.json

RUNS.json: {name: [command ("pt", "sft", "dpo" or "rm"), [override, ...]]}, run in order;
RESULT.json gets {name: [metrics of each iteration]} from rank 0.
"""

import json
import sys

from hydra import compose, initialize_config_dir

from mtrain import parallel
from mtrain.cli import to_schema
from mtrain.config import CONF_DIR
from mtrain.dpo import make_dpo_task
from mtrain.pt import make_pt_task
from mtrain.rm import make_rm_task
from mtrain.sft import make_sft_task
from mtrain.trainer import train

TASKS = {"pt": make_pt_task, "sft": make_sft_task, "dpo": make_dpo_task, "rm": make_rm_task}


def main() -> None:
    runs_path, result_path = sys.argv[1:]
    runs = json.loads(open(runs_path).read())
    # Each run leaves megatron's groups at its end; the torch.distributed group is kept for the
    # next one (a command would leave it too, at exit).
    parallel.shutdown = parallel.destroy
    results = {}
    for name, (command, overrides) in runs.items():
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = to_schema(compose(command, overrides))
        results[name] = train(cfg, TASKS[command])
    if parallel.global_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
