"""TEST-ONLY host emulation that lets MindSpeed's pure-Python code import and run on CPU.

Applied by `import torch_npu` (this package). MindSpeed (branch 2.3.0_core_r0.12.1) asks for
more than the four ops: `torch.npu` device calls (npu.py), factory calls and `.to` / `.npu()`
with `device="npu"`, `torch_npu._C._distributed_c10d.ProcessGroupHCCL.Options`,
`torch_npu.unsupported_dtype`, `torchair` (the stub beside this package), its custom ops'
kernels registered for the NPU's dispatch key (PrivateUse1; here they serve CPU tensors too),
and its op builders' `load()`, which on a CANN host JIT-compiles a C++ extension. Here `load()`
answers with the emulated ops of this package (and _gmm.py's grouped matmul); an op with no
emulation raises a NotImplementedError naming it, so a test that reaches one fails loudly
instead of computing something else.

With `TORCH_NPU_EMULATION_RECORD=<dir>` as well, each process counts the calls of the emulated
ops and writes them to `<dir>/ops-<pid>.json` at exit, so a test can tell that MindSpeed's fused
paths ran (and which did not).

The factory wrappers only rewrite an "npu" device to "cpu": any other call is passed through
unchanged. Like mtrain's CPU shim (mtrain/accel/cpu.py), this builds torch's device-constructor
cache from the original functions first, so `with torch.device("meta")` keeps working.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
import types
from typing import Any

import torch

from . import _gmm
from . import npu as npu_module

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "linspace", "eye",
    "rand", "randn", "randint", "randperm", "empty_strided", "empty_like", "zeros_like",
    "ones_like", "full_like", "rand_like", "randn_like", "randint_like",
)  # fmt: skip

# torch_npu's list of dtypes HCCL cannot communicate.
unsupported_dtype = [torch.float64, torch.complex64, torch.complex128]


def _is_npu(dev: Any) -> bool:
    if isinstance(dev, str):
        return dev == "npu" or dev.startswith("npu:")
    return False


def _cpu_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if _is_npu(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return factory


def _patch_torch() -> None:
    from torch.jit._builtins import _find_builtin, _register_builtin
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        fn = getattr(torch, name, None)
        if fn is None:
            continue
        wrapper = _cpu_factory(fn)
        op = _find_builtin(fn)
        if op is not None:
            _register_builtin(wrapper, op)
        setattr(torch, name, wrapper)

    orig_to = torch.Tensor.to

    @functools.wraps(orig_to)
    def to(self, *args, **kwargs):
        if args and _is_npu(args[0]):
            args = ("cpu", *args[1:])
        if _is_npu(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return orig_to(self, *args, **kwargs)

    def to_npu(self, device=None, non_blocking=False, **kwargs):
        return orig_to(self, "cpu", non_blocking=non_blocking)

    torch.Tensor.to = to
    torch.Tensor.npu = to_npu
    torch.npu = npu_module
    sys.modules["torch.npu"] = npu_module
    torch.library.impl = _cpu_too(torch.library.impl)


def _cpu_too(impl):
    """`torch.library.impl(lib, name, "PrivateUse1")` (the NPU's dispatch key, under which
    MindSpeed registers its custom ops, e.g. mindspeed::npu_gmm) also registers the kernel for
    CPU tensors, which is what the emulation's "npu" tensors are."""

    @functools.wraps(impl)
    def register(*args, **kwargs):
        key = args[2] if len(args) > 2 else kwargs.get("dispatch_key")
        if key != "PrivateUse1" or not isinstance(args[0], torch.library.Library):
            return impl(*args, **kwargs)
        for_npu = impl(*args, **kwargs)
        for_cpu = impl(args[0], args[1], "CPU")

        def both(fn):
            for_cpu(fn)
            return for_npu(fn)

        return both

    return register


class _HCCLOptions:
    """`ProcessGroupHCCL.Options()`: MindSpeed sets `hccl_config` on it; gloo never reads it."""

    hccl_config: dict = {}


def _c_module() -> types.ModuleType:
    c10d = types.ModuleType("torch_npu._C._distributed_c10d")
    c10d.ProcessGroupHCCL = types.SimpleNamespace(Options=_HCCLOptions)
    c = types.ModuleType("torch_npu._C")
    c._distributed_c10d = c10d
    sys.modules["torch_npu._C"] = c
    sys.modules["torch_npu._C._distributed_c10d"] = c10d
    return c


class _EmulatedOps:
    """What an op builder's `load()` returns: the emulated op of that name, or a loud refusal."""

    def __init__(self, builder: str, ops: dict[str, Any]):
        self._builder, self._ops = builder, ops

    def __getattr__(self, name: str):
        if name in self._ops:
            return self._ops[name]
        raise NotImplementedError(
            f"torch_npu emulation: MindSpeed op {name!r} (builder {self._builder}) has no CPU "
            "emulation; add one to tests/npu_emulation/torch_npu or keep the test off that path"
        )


def _fusion_attention_v2(q, k, v, head_num, layout, pse, padding_mask, atten_mask, scale,
                         keep_prob, pre, nxt, inner_precise, prefix, qlen, kvlen, sparse_mode,
                         gen_mask_parallel, sync, pse_type=1, q_start=None, kv_start=None):  # fmt: skip
    """MindSpeed's FusionAttentionV2 builder op (positional arguments) as the torch_npu op."""
    import torch_npu

    return torch_npu.npu_fusion_attention(
        q, k, v, head_num, layout, pse=pse, padding_mask=padding_mask, atten_mask=atten_mask,
        scale=scale, keep_prob=keep_prob, pre_tockens=pre, next_tockens=nxt, prefix=prefix,
        actual_seq_qlen=qlen, actual_seq_kvlen=kvlen, sparse_mode=sparse_mode,
    )  # fmt: skip


def _fusion_attention_grad_v2(q, k, v, dy, head_num, layout, pse, padding_mask, atten_mask,
                              softmax_max, softmax_sum, softmax_in, attention_in, scale,
                              keep_prob, pre, nxt, inner_precise, seed, offset, numels, prefix,
                              qlen, kvlen, sparse_mode, gen_mask_parallel, sync, pse_type=1,
                              q_start=None, kv_start=None):  # fmt: skip
    import torch_npu

    return torch_npu.npu_fusion_attention_grad(
        q, k, v, dy, head_num, layout, pse=pse, padding_mask=padding_mask,
        atten_mask=atten_mask, softmax_max=softmax_max, softmax_sum=softmax_sum,
        attention_in=attention_in, scale_value=scale, keep_prob=keep_prob, pre_tockens=pre,
        next_tockens=nxt, prefix=prefix, actual_seq_qlen=qlen, actual_seq_kvlen=kvlen,
        sparse_mode=sparse_mode,
    )  # fmt: skip


def _builder_ops() -> dict[str, Any]:
    import torch_npu

    ops = {
        name: getattr(torch_npu, name)
        for name in (
            "npu_rotary_position_embedding",
            "npu_fusion_attention",
            "npu_fusion_attention_grad",
            "npu_rms_norm",
            "npu_swiglu",
        )
    }
    ops["npu_fusion_attention_v2"] = _fusion_attention_v2
    ops["npu_fusion_attention_grad_v2"] = _fusion_attention_grad_v2
    ops["npu_gmm"], ops["npu_gmm_backward"] = _gmm.npu_gmm, _gmm.npu_gmm_backward
    return ops


def _patch_builder(module: types.ModuleType) -> None:
    def load(self, verbose=True):
        return _EmulatedOps(type(self).__name__, _builder_ops())

    module.MindSpeedOpBuilder.load = load


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patches `mindspeed.op_builder.builder` right after it is imported (MindSpeed is not
    importable when torch_npu is, so the patch waits for it)."""

    TARGET = "mindspeed.op_builder.builder"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            _patch_builder(module)

        spec.loader.exec_module = exec_then_patch
        return spec


_OPS = (
    "npu_fusion_attention",
    "npu_fusion_attention_grad",
    "npu_rms_norm",
    "npu_swiglu",
    "npu_rotary_mul",
    "npu_rotary_position_embedding",
)


def _record_calls(package: types.ModuleType, directory: str) -> None:
    import atexit
    import collections
    import json
    import os

    calls: collections.Counter = collections.Counter()
    for module, names in ((package, _OPS), (_gmm, ("npu_gmm", "npu_gmm_backward"))):
        for name in names:
            op = getattr(module, name, None)
            if op is None:
                continue

            def counted(*args, _op=op, _name=name, **kwargs):
                calls[_name] += 1
                return _op(*args, **kwargs)

            setattr(module, name, functools.wraps(op)(counted))

    def write() -> None:
        path = os.path.join(directory, f"ops-{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump(dict(calls), f)

    atexit.register(write)


def install(package: types.ModuleType) -> None:
    import os

    if getattr(torch, "npu", None) is npu_module:
        return
    if os.environ.get("TORCH_NPU_EMULATION_RECORD"):
        _record_calls(package, os.environ["TORCH_NPU_EMULATION_RECORD"])
    _patch_torch()
    package._C = _c_module()
    package.unsupported_dtype = unsupported_dtype
    sys.meta_path.insert(0, _AfterImport())
