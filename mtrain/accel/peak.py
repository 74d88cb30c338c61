"""Dense bf16/fp16 peak FLOP/s per device, for MFU. Matched by substring of the device name.

Vendor figures without sparsity. Override with `log.peak_tflops=` for anything not listed.
"""

from __future__ import annotations

PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0),
    ("H100", 989.0),  # SXM; the PCIe card is 756
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


def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    compact = device_name.replace(" ", "")
    for key, value in PEAK_TFLOPS:
        if key.replace(" ", "") in compact:
            return value
    return None
