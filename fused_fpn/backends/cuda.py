"""The "cuda" backend: the C++/CUDA kernel of csrc/cuda/ (torch.ops.fused_fpn.lateral on CUDA)."""
from typing import Optional

import torch

from .. import _ops
from .._extension import cuda_built, extension_error, extension_loaded

NAME = "cuda"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unavailable_reason() -> Optional[str]:
    if not extension_loaded():
        return f"the native extension fused_fpn._C is not built ({extension_error()})"
    if not cuda_built():
        return "fused_fpn._C was built without the CUDA kernels (no nvcc or a CPU-only torch at build time)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def unsupported_reason(x: torch.Tensor) -> Optional[str]:
    if x.device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got device {x.device}"
    if x.dtype not in DTYPES:
        return f"the cuda backend supports dtypes {[str(d) for d in DTYPES]}, got {x.dtype}"
    return None


def lateral(x, weight, bias, top):
    _ops.register()
    return torch.ops.fused_fpn.lateral(x, weight, bias, top)
