"""The "cuda" backend: the C++/CUDA kernels of csrc/cuda/ (torch.ops.fused_fpn.lateral on CUDA).

Forward: one tensor-core GEMM over pixels (fp16 / bf16 with fp32 accumulation; fp32 on TF32 tensor
cores when eager conv2d may use them (``torch.backends.cudnn.allow_tf32``, or since torch 2.9
``torch.backends.cudnn.conv.fp32_precision``), exact fp32 FMA when not)
with the bias + nearest-gather epilogue fused; NCHW and channels_last read through strides. A level
without a top map whose x is dense NCHW or channels_last (P5) is a plain 1x1 convolution + bias:
it runs as ATen's conv2d (cuDNN), which is what eager runs, bit for bit (csrc/cuda/lateral_cuda.cpp,
runs_as_convolution).
Backward: dx, dW as cuBLAS GEMMs through ATen (csrc/autograd.cpp: deterministic without
torch.use_deterministic_algorithms, fp32 accumulation for fp16 / bf16; fp32 follows
``torch.backends.cuda.matmul.allow_tf32``); db + dtop in one deterministic pass over dy.
float64 is not supported on CUDA (use the "torch" backend, e.g. for gradcheck).
"""
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
