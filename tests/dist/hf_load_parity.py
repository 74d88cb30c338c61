"""Worker: the weights a rank gets from an HF directory directly vs from its conversion.

    torchrun --nproc_per_node 4 tests/dist/hf_load_parity.py RESULT.json HF_DIR CKPT TP PP PRECISION

Direct: chunks built without initialisation, every parameter first set to NaN, then filled by
`load_hf_weights`. Reference: chunks built with the usual init, then filled from the converted
checkpoint. Writes, per rank, the names of the tensors that differ (dtype or any bit, or the
tensor-parallel attributes megatron marks sharded weights with).
"""

import json
import sys
from dataclasses import replace

import torch

from mtrain import accel, parallel
from mtrain.checkpoint import load_hf_weights, load_model_weights
from mtrain.models.provider import BuildOptions, build_model_chunks
from mtrain.models.spec import load_hf_config


def main() -> None:
    result, hf_dir, ckpt = sys.argv[1:4]
    tp, pp, precision = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    spec, _ = load_hf_config(hf_dir)
    accel.activate("cpu")
    parallel.init(tp, pp)
    opts = BuildOptions(tp=tp, pp=pp, precision=precision)
    (direct,) = build_model_chunks(spec, replace(opts, initialize=False))
    with torch.no_grad():
        for param in direct.parameters():
            param.fill_(float("nan"))
    load_hf_weights([direct], hf_dir, spec, tp, pp, 1)
    (converted,) = build_model_chunks(spec, opts)
    load_model_weights([converted], ckpt, spec, tp, pp)
    got, want = direct.state_dict(), converted.state_dict()
    differ = sorted(set(got) ^ set(want))
    for name, tensor in want.items():
        if isinstance(tensor, torch.Tensor) and name in got:
            same = got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
            if not same:
                differ.append(name)
    # The tensor-parallel attributes (gradient norm, optimizer) too, built with init or without.
    keys = ("tensor_model_parallel", "partition_dim", "partition_stride")
    marks = dict(converted.named_parameters())
    for name, param in direct.named_parameters():
        if [getattr(param, k, None) for k in keys] != [getattr(marks[name], k, None) for k in keys]:
            differ.append(f"{name} (tensor-parallel attributes)")
    rows = [None] * torch.distributed.get_world_size()
    row = {"rank": torch.distributed.get_rank(), "differ": differ, "tensors": len(want)}
    torch.distributed.all_gather_object(rows, row)
    if torch.distributed.get_rank() == 0:
        with open(result, "w") as f:
            json.dump(rows, f)
    parallel.shutdown()


if __name__ == "__main__":
    main()
