"""Test-only stand-in for `torch_npu.contrib.transfer_to_npu`.

The real module rewrites `torch.cuda` / `"cuda"` / `nccl` to `torch.npu` / `"npu"` / `hccl` on
import. Here nothing is patched, so a process keeps resolving to the CPU backend; `imported`
only lets a test see that mtrain's NPU set-up asked for the mapping.
"""

imported = True
