"""mtrain: LLM training on megatron-core for Ascend NPU, CUDA and CPU."""

__version__ = "0.1.0"
