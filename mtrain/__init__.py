"""mtrain: LLM training on megatron-core for Ascend NPU, CUDA and CPU."""

from mtrain import accel as _accel
from mtrain.accel import runtime_env as _runtime_env

# Before anything imports torch (which may load torch_npu at once): see accel/runtime_env.py.
if _accel.installed("torch_npu"):
    _runtime_env.apply_npu_defaults()

__version__ = "0.1.0"
