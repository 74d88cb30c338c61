"""Worker: LoRA on megatron's column- and row-parallel linears at TP=2, with and without sequence
parallelism, against the same layer computed densely on one process.

    torchrun --nproc_per_node 2 tests/dist/lora_linear.py RESULT.json

For each case it records the max |difference| of the output, the input gradient and the
gradients of A and B (after the TP all-reduce megatron applies to parameters marked
`sequence_parallel`), each compared on this rank's part of the dense result.
"""

import json
import sys

import torch

from mtrain import accel, parallel
from mtrain.config.lora import LoraConfig

IN, OUT, SEQ, BATCH, R = 16, 24, 8, 2, 4
CFG = LoraConfig(r=R, alpha=8.0)


def dense(seed: int):
    g = torch.Generator().manual_seed(seed)
    w, a, b = (torch.randn(*s, generator=g) for s in ((OUT, IN), (R, IN), (OUT, R)))
    x, grad_out = torch.randn(SEQ, BATCH, IN, generator=g), torch.randn(SEQ, BATCH, OUT, generator=g)
    a, b, x = (t.clone().requires_grad_(True) for t in (a, b, x))
    y = x @ w.T + CFG.scaling * (x @ a.T) @ b.T
    (y * grad_out).sum().backward()
    return w, a, b, x, y.detach(), grad_out


def run_case(mode: str, sp: bool, rank: int, tp: int) -> dict[str, float]:
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from mtrain.lora import attach_adapter

    w, a, b, x, y, grad_out = dense(seed=int(sp) * 2 + (mode == "row"))
    config = ModelParallelConfig(
        tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True
    )
    init = torch.nn.init.zeros_
    if mode == "column":
        base = ColumnParallelLinear(IN, OUT, config=config, init_method=init, bias=False)
        out_part = slice(rank * OUT // tp, (rank + 1) * OUT // tp)
        w_local, a_local, b_local = w[out_part], a, b[out_part]
        seq = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp) if sp else slice(None)
        x_local = x[seq]
        y_local, g_local = y[..., out_part], grad_out[..., out_part]
        want = {"x": x.grad[seq], "a": a.grad, "b": b.grad[out_part]}
    else:
        base = RowParallelLinear(
            IN, OUT, config=config, init_method=init, bias=False, input_is_parallel=True,
            skip_bias_add=False,
        )  # fmt: skip
        in_part = slice(rank * IN // tp, (rank + 1) * IN // tp)
        w_local, a_local, b_local = w[:, in_part], a[:, in_part], b
        x_local = x[..., in_part]
        seq = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp) if sp else slice(None)
        y_local, g_local = y[seq], grad_out[seq]
        want = {"x": x.grad[..., in_part], "a": a.grad[:, in_part], "b": b.grad}
    base.weight.data.copy_(w_local)
    base.weight.requires_grad_(False)
    attach_adapter(base, CFG, seed=0, sequence_parallel=sp)
    base.lora_A.weight.data.copy_(a_local.detach())
    base.lora_B.weight.data.copy_(b_local.detach())
    xin = x_local.detach().clone().requires_grad_(True)
    out, _ = base(xin)
    (out * g_local).sum().backward()
    grads = {"x": xin.grad, "a": base.lora_A.weight.grad, "b": base.lora_B.weight.grad}
    for key, param in (("a", base.lora_A.weight), ("b", base.lora_B.weight)):
        if getattr(param, "sequence_parallel", False):  # as megatron's finalize_model_grads
            torch.distributed.all_reduce(
                grads[key], group=parallel_state.get_tensor_model_parallel_group()
            )
    diffs = {"out": (out.detach() - y_local).abs().max().item()}
    diffs.update({k: (grads[k] - want[k]).abs().max().item() for k in grads})
    diffs["marked"] = [
        k for k, p in (("a", base.lora_A.weight), ("b", base.lora_B.weight))
        if getattr(p, "sequence_parallel", False)
    ]  # fmt: skip
    return diffs


def main() -> None:
    accel.activate("cpu")
    parallel.init(tp=2)
    rank = torch.distributed.get_rank()
    results = {
        f"{mode}{'-sp' if sp else ''}": run_case(mode, sp, rank, 2)
        for mode in ("column", "row")
        for sp in (False, True)
    }
    everyone = [None, None]
    torch.distributed.all_gather_object(everyone, results)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(everyone, f)
    parallel.shutdown()


if __name__ == "__main__":
    main()
