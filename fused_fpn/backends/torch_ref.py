"""The "torch" backend: the pure-PyTorch reference (unfused; runs everywhere, every float dtype)."""
from typing import Optional

import torch

from ..reference import lateral_reference

NAME = "torch"


def unavailable_reason() -> Optional[str]:
    return None


def unsupported_reason(x: torch.Tensor) -> Optional[str]:
    if not x.dtype.is_floating_point:
        return f"dtype {x.dtype} is not a floating-point dtype"
    return None


def lateral(x, weight, bias, top):
    return lateral_reference(x, weight, bias, top)
