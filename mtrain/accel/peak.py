"""Dense bf16 peak FLOP/s per device, for MFU. Matched by substring of the device name, first
entry first (so the more specific names come before the ones they contain).

Vendor datasheet figures for dense bf16 tensor-core math (no 2:4 sparsity). A device that is not
listed has no peak: MFU is then not reported, never guessed. Override with `log.peak_tflops=`
(bench/gpu.py: `--peak-tflops`).
"""

from __future__ import annotations

from dataclasses import dataclass

PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM; also the GPU of a GH200
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800 PCIe", 756.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("Ascend910B1", 414.0),
    ("Ascend910B2", 376.0),
    ("Ascend910B3", 313.0),
    ("Ascend910B4", 280.0),
    ("Ascend910_93", 376.0),  # Atlas A3, per die
]


@dataclass(frozen=True)
class Peak:
    """A device's peak, or why there is none."""

    tflops: float | None
    reason: str  # where the figure comes from, or why it is missing


def lookup(device_name: str | None) -> Peak:
    if not device_name:
        return Peak(None, "no accelerator name (CPU run): no peak to compare with")
    compact = device_name.replace(" ", "")
    for key, value in PEAK_TFLOPS:
        if key.replace(" ", "") in compact:
            return Peak(value, f"{key}: {value:g} TFLOP/s dense bf16 (mtrain/accel/peak.py)")
    return Peak(
        None,
        f"device {device_name!r} is not in mtrain/accel/peak.py's table; give its dense bf16 "
        "peak (log.peak_tflops=, or --peak-tflops for bench/gpu.py)",
    )


def peak_tflops(device_name: str | None) -> float | None:
    return lookup(device_name).tflops
