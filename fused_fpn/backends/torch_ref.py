"""The "torch" backend: the pure-PyTorch reference (unfused; runs everywhere; float16, bfloat16,
float32, float64)."""
from typing import Optional

import torch

from .._checks import FLOAT_DTYPES
from ..reference import lateral_reference

NAME = "torch"


def unavailable_reason() -> Optional[str]:
    return None


def unsupported_reason(x: torch.Tensor) -> Optional[str]:
    if x.dtype not in FLOAT_DTYPES:
        return f"dtype {x.dtype} is not one of {[str(d) for d in FLOAT_DTYPES]}"
    return None


def lateral(x, weight, bias, top):
    return lateral_reference(x, weight, bias, top)
