"""RMSNorm, SwiGLU and rotary embedding with torch_npu's signatures (see the package docstring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def npu_rms_norm(
    self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x * rsqrt(mean(x^2) + epsilon) * gamma over gamma's dims; rstd is float32, keepdim."""
    x = self.float()
    dims = tuple(range(-gamma.dim(), 0))
    rstd = torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (x * rstd * gamma.float()).to(self.dtype), rstd


def npu_swiglu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if input.shape[dim] % 2:
        raise ValueError(f"npu_swiglu: size {input.shape[dim]} of dim {dim} is not even")
    gate, up = input.float().chunk(2, dim=dim)
    return (F.silu(gate) * up).to(input.dtype)


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The sin partner of x: halves (x1, x2) -> (-x2, x1), or each pair (a, b) -> (-b, a)."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    xf = x.float()
    return (xf * cos.float() + _rotate(xf, interleaved) * sin.float()).to(x.dtype)


def npu_rotary_mul(
    input: torch.Tensor,
    r1: torch.Tensor,
    r2: torch.Tensor,
    rotary_mode: str = "half",
) -> torch.Tensor:
    if rotary_mode not in ("half", "interleave"):
        raise ValueError(f"npu_rotary_mul: rotary_mode={rotary_mode!r}; use 'half' or 'interleave'")
    return _rope(input, r1, r2, interleaved=rotary_mode == "interleave")


def npu_rotary_position_embedding(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: int = 0
) -> torch.Tensor:
    if mode not in (0, 1):
        raise ValueError(
            f"npu_rotary_position_embedding: mode={mode}; use 0 (half) or 1 (interleave)"
        )
    # The kernel takes 4-D tensors only, with cos / sin broadcastable to x.
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        if t.dim() != 4:
            raise ValueError(
                f"npu_rotary_position_embedding: {name} is {t.dim()}-D; it must be 4-D"
            )
    return _rope(x, cos, sin, interleaved=mode == 1)
