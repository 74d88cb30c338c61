"""Test-only emulation of `torch_npu.utils.collect_env`: the CANN version MindSpeed checks.

MindSpeed's MoE dispatchers compare it with the 8.0.RC1 / RC2 releases to pick a code path
for older CANN; the emulation reports a later release, so the current paths run.
"""

CANN_VERSION = "8.2.RC1"


def get_cann_version() -> str:
    return CANN_VERSION
