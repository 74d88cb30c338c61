"""TEST-ONLY names from `torchair.ge` that MindSpeed's op builders import (see the package)."""


class Tensor:
    pass


class TensorSpec:
    pass


class DataType:
    DT_FLOAT = 0
    DT_FLOAT16 = 1
    DT_BF16 = 27
    DT_INT64 = 9


def custom_op(*args, **kwargs):
    raise NotImplementedError("torchair emulation: there is no graph engine on CPU")
