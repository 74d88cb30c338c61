"""Test-only emulation of `torch_npu.contrib` (see the `torch_npu` package docstring)."""
