"""CPU backend: run megatron-core 0.12.1 on CPU processes joined by gloo.

megatron-core assumes CUDA in many places. :func:`install_shim` points those places at the
CPU, in the spirit of torch_npu's ``transfer_to_npu``. Each patch below names the megatron
code that needs it; none is applied until ``install_shim()`` is called, and none can be undone
in that process.

What the shim does and does not change:

* ``torch.cuda.is_available()`` keeps returning False, so libraries that pick a device for
  themselves (transformers, torch internals) keep choosing the CPU. Only the ``torch.cuda``
  calls megatron makes unconditionally are given CPU answers (device 0 of 1, no-op streams,
  events and synchronisation, zero memory stats).
* Factory functions and ``Tensor.to``/``Tensor.cuda`` rewrite a CUDA device (``"cuda"``,
  ``"cuda:N"``, ``torch.device("cuda")`` or a bare int such as ``torch.cuda.current_device()``)
  to ``"cpu"``. Any other device, ``"meta"`` included, and calls without a device pass through
  untouched, so a call that worked before the shim gives the same result after it.
* The "CUDA" RNG *is* the CPU default generator: ``torch.cuda.manual_seed``/``get_rng_state``
  and megatron's RNG tracker save, seed and restore ``torch``'s CPU generator. Dropout inside
  ``get_cuda_rng_tracker().fork()`` therefore draws from the tensor-parallel stream as on GPU.
* ``Tensor.type()`` reports ``torch.cuda.*Tensor`` for CPU tensors only when the caller is a
  megatron module (its optimizer and grad clipping reject other type strings); everyone else
  still sees ``torch.FloatTensor``.

Verified with megatron-core 0.12.1 under torchrun + gloo: GPTModel (local spec) training at
TP2xPP2, DP2xTP2 and interleaved TP2xPP2xVPP2, tied and untied embeddings, DDP with and without
the distributed optimizer and overlap_grad_reduce, grad clipping, OptimizerParamScheduler,
dropout with full recompute (bit-identical to no recompute). Not covered: sequence parallelism
(megatron's local spec refuses it without Apex norms, a CPU-independent limit), autocast
(``enable_autocast`` asks for ``torch.autocast("cuda")``), CUDA graphs, custom FSDP, and the CPU
offloading optimizer.

RoPE pitfall (transformers in the same process), found and fixed here. Cause: torch's
``with torch.device(d)`` context (``torch.utils._device.DeviceContext``) only fills in the
device for functions in ``_device_constructors()``, a set of ``torch.*`` function objects built
on first use and cached. If the shim replaces ``torch.empty``/``torch.tensor``/... before that
set exists, the set holds the wrappers while the mode sees the builtins they call, so
``with torch.device("meta")`` silently creates CPU tensors. transformers' ``from_pretrained``
builds models under that context and probes it with ``torch.tensor([]).device``; seeing "cpu",
it runs ``init_weights()`` during construction, which flags every module
``_is_hf_initialized``. Loading then swaps non-persistent buffers (``rotary_emb.inv_freq``,
``original_inv_freq``) for ``torch.empty_like(...)`` and skips re-initialising the flagged
rotary module, so those buffers keep uninitialised memory. The shim builds that set from the
original functions before patching (and registers the wrappers with TorchScript for the same
reason); a tiny Qwen3 then gives bit-identical logits before and after ``install_shim()``, both
built directly and through ``from_pretrained`` (``tests/test_cpu_shim.py``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from mtrain.accel import cpu_moe

NAME = "cpu"
DIST_BACKEND = "gloo"

_INSTALLED = False
_TYPE_WRAPPERS: set[Callable] = set()  # the shim's Tensor.type wrappers

# torch factory functions megatron calls with device="cuda" or device=torch.cuda.current_device().
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "linspace", "eye",
    "rand", "randn", "randint", "randperm", "empty_strided", "empty_like", "zeros_like",
    "ones_like", "full_like", "rand_like", "randn_like", "randint_like",
)  # fmt: skip


def device() -> torch.device:
    """The device mtrain puts models and batches on for this backend."""
    return torch.device("cpu")


def device_count() -> int:
    """Devices per node that torchrun may bind a rank to: one CPU "device" per process."""
    return 1


def describe() -> dict[str, str]:
    """A short description of the hardware for logs and ``python -m mtrain.env``."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
    }


def install_shim(before_megatron: Callable[[], None] | None = None) -> None:
    """Patch torch and megatron-core so that megatron's CUDA code paths run on the CPU.

    Idempotent. May be called before or after megatron is imported: the megatron patches
    import ``megatron.core.tensor_parallel.random`` themselves, and every other megatron
    call site looks ``torch.*`` up at call time. ``before_megatron`` runs between the torch
    patches and the megatron ones, for a caller that must import something before megatron
    (MindSpeed's adaptor, in mtrain's test-only MindSpeed-on-CPU runs); ``Tensor.type`` is
    wrapped again after it, in case it wrapped that method too (a wrapper between megatron and
    the shim's would hide megatron's frame).
    """
    global _INSTALLED
    if _INSTALLED:
        return
    _patch_torch_cuda()
    _patch_factories()
    _patch_tensor_methods()
    if before_megatron is not None:
        before_megatron()
        _rewrap_type()
    _patch_megatron_rng()
    cpu_moe.patch_megatron_moe()
    _INSTALLED = True


# --- device mapping -------------------------------------------------------------------------


def _is_cuda_device(dev: Any) -> bool:
    """True for the ways megatron names a GPU: "cuda", "cuda:N", torch.device("cuda"), N."""
    if isinstance(dev, bool):
        return False
    if isinstance(dev, int):
        return True
    if isinstance(dev, str):
        return dev == "cuda" or dev.startswith("cuda:")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


def _cpu_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        # rope_utils.py get_pos_emb_on_this_cp_rank: torch.tensor(..., pin_memory=True), which
        # needs an accelerator's pinned-memory allocator (context parallelism).
        if kwargs.get("pin_memory") and not torch.cuda.is_available():
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return factory


def _patch_factories() -> None:
    # e.g. tensor_parallel/mappings.py torch.empty(..., device=torch.cuda.current_device()),
    # optimizer/clip_grads.py torch.tensor(..., device='cuda'), schedules.py torch.zeros(device="cuda").
    #
    # `with torch.device(d)` (DeviceContext) only fills in the device for functions found in
    # torch.utils._device._device_constructors(), a set of torch.* objects cached on first use.
    # Built after this patch, it would hold the wrappers, not the builtins the wrappers call, and
    # the context would silently stop working (the RoPE pitfall in the module docstring). Build it
    # now, from the originals.
    #
    # TorchScript likewise knows torch.* builtins by identity; register each wrapper as the same
    # aten op, or scripting any function that calls torch.zeros & co. fails after the shim.
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


def _patch_tensor_methods() -> None:
    orig_to = torch.Tensor.to

    # rotary_pos_embedding.py RotaryEmbedding.forward: inv_freq.to(device=current_device());
    # transformer_layer.py: .to(torch.cuda.current_device()).
    @functools.wraps(orig_to)
    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = ("cpu", *args[1:])
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return orig_to(self, *args, **kwargs)

    # language_module.py setup_embeddings_and_output_layer: weight.data.cuda();
    # schedules.py torch.tensor(0).cuda(); grad_scaler.py .cuda(current_device()).
    def cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        return orig_to(self, "cpu", non_blocking=non_blocking, memory_format=memory_format)

    torch.Tensor.to = to
    torch.Tensor.cuda = cuda
    # MoE all-to-all, tensor_parallel/mappings.py: input.new_empty(device=current_device()).
    for name in ("new_empty", "new_zeros", "new_ones", "new_full"):
        setattr(torch.Tensor, name, _cpu_factory(getattr(torch.Tensor, name)))
    torch.Tensor.type = _cuda_type_for_megatron(torch.Tensor.type)


def _cuda_type_for_megatron(orig_type):
    """optimizer/optimizer.py + distrib_optimizer.py accept only
    'torch.cuda.{Float,Half,BFloat16}Tensor' params; optimizer/clip_grads.py asserts
    grad.type() == 'torch.cuda.FloatTensor'. Only megatron's own frames get the CUDA name;
    everyone else sees the real type."""

    @functools.wraps(orig_type)
    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = orig_type(self)
            if self.device.type == "cpu" and _called_from_megatron():
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        return orig_type(self, dtype, non_blocking, **kwargs)

    _TYPE_WRAPPERS.add(tensor_type)
    return tensor_type


def _rewrap_type() -> None:
    """Wrap `type` again on the classes where something replaced the shim's wrapper."""
    for cls in (torch.Tensor, torch.nn.Parameter):
        current = cls.__dict__.get("type")
        # By identity: functools.wraps copies a marker attribute onto a wrapper of the wrapper.
        if current is not None and current not in _TYPE_WRAPPERS:
            cls.type = _cuda_type_for_megatron(current)


def _called_from_megatron() -> bool:
    """Whether the code that called Tensor.type() (two frames up) is a megatron module."""
    return sys._getframe(2).f_globals.get("__name__", "").startswith("megatron.")


# --- torch.cuda -----------------------------------------------------------------------------


class _Event:
    """Stands in for torch.cuda.Event: CPU work is synchronous, so an event is a timestamp."""

    def __init__(
        self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False
    ):
        self._time: float | None = None

    def record(self, stream: Any = None) -> None:
        self._time = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end_event: _Event) -> float:
        """Milliseconds between the two records, as torch.cuda.Event reports."""
        return (end_event._time - self._time) * 1000.0


class _Stream:
    """Stands in for torch.cuda.Stream: there is one in-order CPU stream, so waits are no-ops."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any):
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: _Event | None = None) -> _Event:
        event = event or _Event()
        event.record()
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_STREAM = _Stream()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # Device queries: ~60 call sites of the form device=torch.cuda.current_device() (mapped to
    # CPU by the factory patches); parallel_state, DDP and p2p_communication call these too.
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None
    # p2p_communication.py after batch_isend_irecv, utils.py timers.
    cuda.synchronize = lambda device=None: None
    # distributed_data_parallel.py / param_and_grad_buffer.py communication streams, utils.py timers.
    cuda.Event = _Event
    cuda.Stream = _Stream
    cuda.current_stream = lambda device=None: _STREAM
    cuda.default_stream = lambda device=None: _STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    # Memory reporting in megatron's and mtrain's logs: the CPU has no device allocator to ask.
    for name in (
        "memory_allocated",
        "max_memory_allocated",
        "memory_reserved",
        "max_memory_reserved",
    ):
        setattr(cuda, name, lambda device=None: 0)
    cuda.memory_stats = lambda device=None: {}
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.empty_cache = lambda: None
    # tensor_parallel/random.py CudaRNGStatesTracker.add and model_parallel_cuda_manual_seed call
    # torch.cuda.get_rng_state / manual_seed: the "CUDA" generator is the CPU default generator.
    # torch.manual_seed itself calls torch.cuda.manual_seed_all, hence the generator methods here.
    # Each name gets its own Python function: dynamo indexes torch.cuda.* by name on import and
    # rejects one object registered under two names with different tracing rules.
    gen = torch.default_generator
    rng = {
        "get_rng_state": lambda device="cuda": gen.get_state(),
        "set_rng_state": lambda new_state, device="cuda": gen.set_state(new_state),
        "get_rng_state_all": lambda: [gen.get_state()],
        "set_rng_state_all": lambda new_states: gen.set_state(new_states[0]),
        "manual_seed": lambda seed: _seed(gen, seed),
        "manual_seed_all": lambda seed: _seed(gen, seed),
        "seed": lambda: _seed(gen),
        "seed_all": lambda: _seed(gen),
        "initial_seed": lambda: gen.initial_seed(),
    }
    for name, fn in rng.items():
        setattr(cuda, name, fn)
        setattr(cuda.random, name, fn)


def _seed(gen: torch.Generator, seed: int | None = None) -> None:
    """torch.cuda.manual_seed / seed on the CPU generator (they return None, unlike Generator's)."""
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))


# --- megatron RNG tracker -------------------------------------------------------------------


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    # random.py _get_cuda_rng_state / _set_cuda_rng_state go through torch.cuda.default_generators
    # and torch.cuda._lazy_call; on a CPU build the latter queues the call forever, so restoring
    # the RNG state after fork() or during activation recomputation would silently do nothing.
    def get_state(
        device: Any = "cuda", clone: bool = False, graph_safe: bool = False
    ) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state

    original = mrandom.CudaRNGStatesTracker

    class CpuRNGStatesTracker(original):
        """CudaRNGStatesTracker whose fork() does not warn about the CPU RNG changing.

        megatron's fork() warns when the CPU RNG moves inside the fork, which is meant to catch
        CPU random ops inside GPU-RNG regions; here the two generators are one, so any dropout in
        the forked region would log that warning.
        """

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"cuda rng state {name} is not added")
            orig_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig_state)

    # initialize_rng_tracker() instantiates random.CudaRNGStatesTracker by its module-level name;
    # isinstance checks (get_all_rng_states, cuda_graphs) still pass for the subclass.
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    if tracker is not None and type(tracker) is original:
        tracker.__class__ = CpuRNGStatesTracker
