"""MindSpeed's grouped matmul (its GMM op builders' `npu_gmm` / `npu_gmm_backward`), in plain
PyTorch, for the MindSpeed harness (see _host.py). TEST-ONLY.

The rows of x [M, K] come in E consecutive groups, group e multiplied by weight[e] [K, N]:
y [M, N]. `group_list` says where the groups end: group_list_type 0 gives the cumulative end
row of each group (e.g. [3, 3, 7] for sizes 3, 0, 4), 1 the group sizes themselves; a tensor or
a list of ints, one entry per group, covering all M rows. Only group_type 0 (the groups split
x's rows, as MoE experts do) is emulated; the others are refused by name. Lists as MindSpeed
passes them: one x, one weight, no bias.
"""

from __future__ import annotations

import torch


def _sizes(group_list, experts: int, rows: int, group_list_type: int) -> list[int]:
    given = [int(v) for v in (group_list.tolist() if torch.is_tensor(group_list) else group_list)]
    if len(given) != experts:
        raise ValueError(f"npu_gmm: group_list has {len(given)} entries for {experts} weights")
    if group_list_type == 0:
        sizes = [b - a for a, b in zip([0, *given[:-1]], given)]
    elif group_list_type == 1:
        sizes = given
    else:
        raise ValueError(f"npu_gmm: group_list_type={group_list_type}; use 0 or 1")
    if any(s < 0 for s in sizes) or sum(sizes) != rows:
        raise ValueError(f"npu_gmm: group sizes {sizes} do not split the {rows} rows of x")
    return sizes


def _one(tensors, name: str) -> torch.Tensor:
    if len(tensors) != 1:
        raise NotImplementedError(f"npu_gmm emulation: {name} must be a list of one tensor")
    return tensors[0]


def _check(group_type: int, bias) -> None:
    if group_type != 0:
        raise NotImplementedError(f"npu_gmm emulation: group_type={group_type} (only 0)")
    if bias:
        raise NotImplementedError("npu_gmm emulation: bias is not emulated")


def npu_gmm(x, weight, bias, group_list, group_type, group_list_type):
    """-> [y]: x[rows of group e] @ weight[e], in float32, cast back to x's dtype."""
    _check(group_type, bias)
    x, w = _one(x, "x"), _one(weight, "weight")
    sizes = _sizes(group_list, w.shape[0], x.shape[0], group_list_type)
    parts = [xe.float() @ we.float() for xe, we in zip(x.split(sizes), w)]
    return [torch.cat(parts).to(x.dtype) if parts else x.new_zeros(0, w.shape[-1])]


def npu_gmm_backward(grad, x, weight, group_list, group_list_type):
    """-> ([dx], [dweight], []): dx = grad_e @ weight[e]^T, dweight[e] = x_e^T @ grad_e."""
    g, x, w = _one(grad, "grad"), _one(x, "x"), _one(weight, "weight")
    sizes = _sizes(group_list, w.shape[0], x.shape[0], group_list_type)
    ge, xe = g.float().split(sizes), x.float().split(sizes)
    dx = torch.cat([gi @ wi.float().t() for gi, wi in zip(ge, w)]).to(x.dtype)
    dw = torch.stack([xi.t() @ gi for xi, gi in zip(xe, ge)]).to(w.dtype)
    return [dx], [dw], []
