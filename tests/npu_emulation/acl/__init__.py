"""TEST-ONLY stub of CANN's `acl` runtime module (pyACL), so that MindSpeed's MoE modules import.

MindSpeed imports `acl` at the top of its MoE overlap modules and asks it for the chip name
(`get_soc_name()`) only on paths that overlap MoE communication with compute, which mtrain's
runs do not take. The stub names an Atlas A2 chip; anything else it is asked for is refused
by name (an AttributeError, so that `hasattr` probes answer False). Never install this for real
use.
"""

SOC_NAME = "Ascend910B3"


def get_soc_name() -> str:
    return SOC_NAME


def __getattr__(name: str):
    raise AttributeError(
        f"acl emulation: acl.{name} is not emulated (tests/npu_emulation/acl); keep the test "
        "off the MindSpeed path that needs it"
    )
