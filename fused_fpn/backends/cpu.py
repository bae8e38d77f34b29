"""The "cpu" backend: the C++ tile-fused kernel of csrc/cpu/ (torch.ops.fused_fpn.lateral on CPU)."""
from typing import Optional

import torch

from .. import _ops
from .._extension import extension_error, extension_loaded

NAME = "cpu"
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def unavailable_reason() -> Optional[str]:
    if not extension_loaded():
        return f"the native extension fused_fpn._C is not built ({extension_error()})"
    return None


def unsupported_reason(x: torch.Tensor) -> Optional[str]:
    if x.device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got device {x.device}"
    if x.dtype not in DTYPES:
        return f"the cpu backend supports dtypes {[str(d) for d in DTYPES]}, got {x.dtype}"
    return None


def lateral(x, weight, bias, top):
    _ops.register()
    return torch.ops.fused_fpn.lateral(x, weight, bias, top)
