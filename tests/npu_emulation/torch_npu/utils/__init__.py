"""Test-only emulation of `torch_npu.utils` (see the `torch_npu` package docstring)."""
