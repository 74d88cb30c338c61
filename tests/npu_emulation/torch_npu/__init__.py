"""TEST-ONLY emulation of the torch_npu ops mtrain uses, in plain PyTorch (CPU, autograd).

NEVER install this for real use: it has no NPU, no `torch.npu`, and no cuda -> npu mapping. It
exists so that a test process started with `PYTHONPATH=tests/npu_emulation` can `import
torch_npu` on a CPU machine and run code written against the real op signatures; with it on the
path, `mtrain.accel.resolve("auto")` still answers "cpu". Every op computes in float32 and casts
its output back to the input's dtype. `importlib.metadata.version("torch-npu")` reads "2.7.1"
from the `torch_npu-2.7.1.dist-info` beside this package.

Ops (names and signatures as in torch_npu 2.7.1):

* `npu_fusion_attention(query, key, value, head_num, input_layout, ...)` ->
  `(out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)`:
  out = dropout(softmax(mask(scale * q @ k^T)), keep_prob) @ v, in the query's layout and dtype.
  - layouts: "BSH" [B,S,N*D], "SBH" [S,B,N*D], "BSND", "BNSD", and "TND" [T,N,D] (packed
    variable-length sequences; `actual_seq_qlen` / `actual_seq_kvlen` are CUMULATIVE end offsets,
    e.g. [3, 7, 12] for lengths 3, 4, 5, required for TND and refused otherwise; tokens never
    attend across sequences).
  - GQA: key/value may have N_kv heads, N_kv dividing head_num; query head i reads kv head
    i // (head_num // N_kv). For the H layouts D = H_q / head_num and N_kv = H_kv / D.
  - atten_mask (bool or uint8): True / 1 = masked out, NOT attended. [Sq,Skv], [1,1,Sq,Skv],
    [B,1,Sq,Skv] or [B,N,Sq,Skv]; for TND a [maxSq, maxSkv] mask whose top-left corner each
    sequence uses.
  - scale multiplies q @ k^T before the softmax; keep_prob < 1 zeroes each probability with
    probability 1 - keep_prob and rescales the rest by 1 / keep_prob.
  - sparse_mode 0 (defaultMask): no mask -> no masking (pre/next_tockens ignored); with a mask,
    key j is also hidden from query i unless i - pre_tockens <= j <= i + next_tockens (aligned
    top-left). 1 (allMask): atten_mask alone. 2 (leftUpCausal): key j <= i. 3 (rightDownCausal):
    key j <= i + Skv - Sq. 4 (band): i + Skv - Sq - pre_tockens <= j <= i + Skv - Sq +
    next_tockens. Modes 2-4 take the compressed mask torch.triu(torch.ones(2048, 2048,
    dtype=torch.bool), diagonal=1) and, for TND, apply within each sequence. Modes 5-8, pse,
    padding_mask and prefix are refused (mtrain does not use them).
  - softmax_max / softmax_sum: float32 [B,N,Sq,8] ([T,N,8] for TND), the row max of the scaled,
    masked scores and the row sum of exp(score - max), repeated over the last dim of 8; a fully
    masked row gives max -inf, sum 0 and an output of zeros. softmax_out is empty; seed, offset
    and numels are 0.
* `npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, ...)` ->
  `(dq, dk, dv, dpse)`: the flash-attention backward, dS = P * (dP - rowsum(dy * out)), with
  P rebuilt from the given `softmax_max` / `softmax_sum` / `attention_in` (those of the whole
  attention, as ring context parallelism passes them for one block of keys) or, without them,
  from the block alone; `scale_value` names the scale; keep_prob must be 1.
* `npu_rms_norm(self, gamma, epsilon=1e-6)` -> `(y, rstd)`, normalising over gamma's dims.
* `npu_swiglu(input, dim=-1)` = silu(first half) * second half along `dim`.
* `npu_rotary_mul(input, r1, r2, rotary_mode="half")` = input * r1 + rotate(input) * r2 (r1 = cos,
  r2 = sin); "half" rotates cat(-x2, x1) of the two halves, "interleave" the pairs
  (x[..., 0::2], x[..., 1::2]).
* `npu_rotary_position_embedding(x, cos, sin, mode=0)`: the same, mode 0 = half, 1 = interleave.

With `TORCH_NPU_EMULATION_HOST=1` in the environment, importing the package also applies the
host emulation MindSpeed needs on CPU (`_host.py`: `torch.npu`, "npu" devices mapped to the CPU,
op builders answered by these ops). Without it, nothing in torch is patched and `torch.npu` does
not exist.
"""

import os as _os
import sys as _sys

from . import _host
from ._attention import npu_fusion_attention, npu_fusion_attention_grad
from ._ops import npu_rms_norm, npu_rotary_mul, npu_rotary_position_embedding, npu_swiglu

__version__ = "2.7.1"
EMULATION = True  # what mtrain's test-only MindSpeed-on-CPU switch checks for
if _os.environ.get("TORCH_NPU_EMULATION_HOST") == "1":
    _host.install(_sys.modules[__name__])

__all__ = [
    "npu_fusion_attention",
    "npu_fusion_attention_grad",
    "npu_rms_norm",
    "npu_rotary_mul",
    "npu_rotary_position_embedding",
    "npu_swiglu",
]
