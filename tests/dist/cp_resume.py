"""Worker: pretraining runs under context parallelism through the trainer, in one set of
processes: uninterrupted at CP2, interrupted and resumed at CP2, and at CP1 on the same tokens.

    torchrun --nproc_per_node 4 tests/dist/cp_resume.py RESULT.json HF_DIR CKPT CORPUS ROOT TP

Writes each run's loss curve ({"cp2", "part1", "part2", "cp1"}) to RESULT.json.
"""

import json
import sys

import torch

from mtrain import parallel
from mtrain.config.model import ModelConfig
from mtrain.pt import PTConfig, make_pt_task
from mtrain.trainer import train

ITERS = 4


def config(hf: str, ckpt: str, corpus: str, root: str, tp: int, cp: int, **extra) -> PTConfig:
    cfg = PTConfig(model=ModelConfig(hf_dir=hf), device="cpu", kernels="local", load=ckpt)
    cfg.data.path, cfg.data.cache_dir = corpus, f"{root}/cache"
    tr = cfg.train
    tr.iters, tr.seq_length, tr.global_batch_size, tr.micro_batch_size = ITERS, 64, 8, 2
    tr.precision, tr.lr = "fp32", 1e-3
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp = tp, 1, cp
    cfg.parallel.distributed_optimizer = True
    for key, value in extra.items():
        group, name = key.split(".")
        setattr(getattr(cfg, group), name, value) if group != "top" else setattr(cfg, name, value)
    return cfg


def main() -> None:
    result, hf, ckpt, corpus, root, tp = sys.argv[1:]
    args = (hf, ckpt, corpus, root, int(tp))
    save = f"{root}/cp_save"
    runs = {
        "cp2": config(*args, cp=2),
        "part1": config(*args, cp=2, **{"top.save": save, "train.exit_after_iters": 2}),
        "part2": config(*args, cp=2, **{"top.save": save}),
        "cp1": config(*args, cp=1),
    }
    # The runs share the job's process group: a run ends by leaving megatron's groups only
    # (a torch.distributed group cannot be joined again under the same torchrun).
    leave, parallel.shutdown = parallel.shutdown, parallel.destroy
    curves = {}
    for name, cfg in runs.items():
        curves[name] = [h["loss"] for h in train(cfg, make_pt_task)]
    parallel.shutdown = leave
    if torch.distributed.get_rank() == 0:
        with open(result, "w") as f:
            json.dump(curves, f)
    parallel.shutdown()


if __name__ == "__main__":
    main()
