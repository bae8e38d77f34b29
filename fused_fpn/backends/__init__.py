"""Backend registry and selection for ``fused_fpn.lateral``.

Every backend is a module in this package with the same small interface:

    NAME: str
    unavailable_reason() -> Optional[str]       None when it can run in this process at all
    unsupported_reason(x) -> Optional[str]      None when it can run on tensors like x (device, dtype)
    lateral(x, weight, bias, top) -> Tensor     weight is [Cout, Cin]; inputs already validated

Backends: "torch" (pure-PyTorch reference), "cpu" (C++ kernel in _C), "triton" (Triton kernels,
GPU; CPU tensors only under TRITON_INTERPRET=1), "cuda" (C++/CUDA kernel in _C).
"""
from __future__ import annotations

import importlib
from typing import Dict, List, NamedTuple, Optional

import torch

from .. import _onnx


class TensorLike(NamedTuple):
    """What selection reads of a tensor (``unsupported_reason``, ``select``): its device and dtype.
    The FPN selects with the dtype its maps will have under autocast without casting one for it."""
    device: torch.device
    dtype: torch.dtype


# name -> module (imported lazily: the triton module imports triton only when asked)
_MODULES: Dict[str, str] = {
    "torch": "fused_fpn.backends.torch_ref",
    "cpu": "fused_fpn.backends.cpu",
    "triton": "fused_fpn.backends.triton",
    "cuda": "fused_fpn.backends.cuda",
}

# "auto": the first backend in this list that can run on the tensors; on CPU tensors the C++ kernel.
# Inside torch.func.grad / vjp / jacrev, "auto" is the "torch" reference (see _functorch_grad_active).
# On CUDA tensors the order comes from the H100 and H200 benchmarks (benchmarks/results/
# nvidia-h100-80gb-hbm3_2026-11-24*, nvidia-h200_2026-11-30*, fp16 channels_last ResNet-50-FPN):
# timed as eager calls, the C++/CUDA kernel has the lower latency (the lateral path in 0.23 ms vs
# Triton's 0.83 ms on the H100, 0.22 vs 0.80 on the H200: Triton's per-launch host overhead dominates
# P3..P5); timed as CUDA-graph replays (kernel time alone), Triton is faster (the path in 0.142 vs
# 0.223 ms on the H100, 0.126 vs 0.220 ms on the H200, every level on both). So "auto" takes Triton
# while torch.compile traces the call (inductor tunes and loads the Triton kernels before it runs or
# captures them) and CUDA otherwise. A CUDA-graph capture by hand (torch.cuda.graph) gets the eager
# order too: its warm-up calls run eagerly, so a capture that switched to Triton would meet kernels
# that were never tuned nor loaded, and tuning (which synchronizes) or loading a kernel module is not
# allowed while a stream captures. Pass backend="triton" to both warm-up and capture to graph Triton.
AUTO_ORDER: Dict[str, tuple] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}
AUTO_ORDER_COMPILED_CUDA = ("triton", "cuda", "torch")


def auto_order(device_type: str) -> tuple:
    """The backends "auto" tries, in order, for tensors on ``device_type`` (before the functorch rule)."""
    if device_type == "cuda" and torch.compiler.is_compiling():
        return AUTO_ORDER_COMPILED_CUDA
    return AUTO_ORDER.get(device_type, ("torch",))


def _functorch_grad_active() -> bool:
    """True inside torch.func.grad / vjp / jacrev (a functorch Grad transform). The fused backends'
    autograd (a C++ autograd Function for cpu / cuda, a torch.library custom op for triton) cannot
    run there; the "torch" reference (plain ATen ops) can."""
    if torch.compiler.is_compiling():
        return False
    stack = _interpreter_stack()
    return bool(stack) and any(ci.key() == _GRAD_TRANSFORM for ci in stack)


_interpreter_stack = getattr(torch._C._functorch, "get_interpreter_stack", lambda: None)
_GRAD_TRANSFORM = torch._C._functorch.TransformType.Grad

BACKEND_NAMES = tuple(_MODULES)
_loaded: Dict[str, object] = {}
_import_errors: Dict[str, str] = {}


def check_name(backend) -> None:
    """ValueError (TypeError for a non-string) naming ``backend`` unless it is "auto" or a known name."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, 'auto' or one of {list(BACKEND_NAMES)}, got "
                        f"{type(backend).__name__} {backend!r}")
    if backend != "auto" and backend not in _MODULES:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKEND_NAMES)}, got {backend!r}")


def get_backend(name: str):
    """The backend module for ``name``, or None if it cannot even be imported."""
    if name in _loaded:
        return _loaded[name]
    if name not in _MODULES:
        raise ValueError(f"unknown fused_fpn backend {name!r}; known backends: {list(BACKEND_NAMES)} or 'auto'")
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        _import_errors[name] = f"cannot import {_MODULES[name]}: {exc}"
        module = None
    _loaded[name] = module
    return module


# Import every backend module now (none imports triton or touches a device at import time unless the
# triton backend can run here, see backends/triton.py): a first import inside a torch.compile'd region
# would be a graph break.
for _name in BACKEND_NAMES:
    get_backend(_name)


def unavailable_reason(name: str) -> Optional[str]:
    module = get_backend(name)
    if module is None:
        return _import_errors.get(name, "not importable")
    return module.unavailable_reason()


def available_backends(device: Optional[torch.device] = None) -> List[str]:
    """Names of the backends usable in this process (sorted); with ``device`` (a torch.device, a device
    string or a CUDA index), those that can run there: none on a device this process cannot use (no
    such GPU, or a device type this torch or machine lacks). ValueError if ``device`` names no device."""
    probe = None if device is None else _device_probe(device)
    if device is not None and probe is None:
        return []
    names = []
    for name in BACKEND_NAMES:
        if unavailable_reason(name) is not None:
            continue
        if probe is not None and get_backend(name).unsupported_reason(probe) is not None:
            continue
        names.append(name)
    return sorted(names)


def _device_probe(device) -> Optional[torch.Tensor]:
    """A [1, 1, 1, 1] float32 tensor on ``device``, or None where this process cannot allocate there."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"device must be a torch.device, a device string such as 'cuda:0' or a CUDA index, got "
                         f"{device!r} ({exc})") from None
    if dev.type == "cuda":
        if not (torch.cuda.is_available() and (dev.index is None or dev.index < torch.cuda.device_count())):
            return None   # (torch.empty would raise "Found no NVIDIA driver" or an invalid-ordinal error)
        return torch.empty((1, 1, 1, 1), device=dev, dtype=torch.float32)   # a GPU that is here: its errors raise
    try:
        return torch.empty((1, 1, 1, 1), device=dev, dtype=torch.float32)
    except (RuntimeError, AssertionError, NotImplementedError, ImportError):   # "not compiled with XPU", no torch.hpu
        return None


def why_not(name: str, x: torch.Tensor) -> Optional[str]:
    """None if backend ``name`` can run on tensors like ``x``, else the reason."""
    reason = unavailable_reason(name)
    if reason is None:
        reason = get_backend(name).unsupported_reason(x)
    return reason


def select(backend: str, x: torch.Tensor):
    """The backend module to run on ``x``; ValueError (listing what can run) if there is none.
    While ``torch.onnx.export`` runs: ``fused_fpn._onnx`` (torchvision's unfused ops, which ONNX
    has) for every backend name."""
    if not isinstance(backend, str):
        check_name(backend)
    if _onnx.exporting() and (backend == "auto" or backend in _MODULES):
        return _onnx
    grad_transform = _functorch_grad_active()
    if backend == "auto":
        order = auto_order(x.device.type)
        if grad_transform:
            order = ("torch",)
        for name in order:
            if why_not(name, x) is None:
                return get_backend(name)
        raise ValueError(f"no fused_fpn backend can run on {x.device.type} tensors of dtype {x.dtype}")
    if backend not in _MODULES:
        raise ValueError(f"unknown fused_fpn backend {backend!r}; known backends: {list(BACKEND_NAMES)} or 'auto'")
    if grad_transform and backend != "torch":
        raise ValueError(
            f"fused_fpn backend {backend!r} cannot run inside torch.func.grad / vjp / jacrev: its autograd is a "
            f"C++ autograd Function or a custom op, which functorch's grad transforms cannot run. Use "
            f"backend='torch' there (backend='auto' picks it).")
    reason = why_not(backend, x)
    if reason is not None:
        can = [n for n in BACKEND_NAMES if why_not(n, x) is None]
        raise ValueError(
            f"fused_fpn backend {backend!r} cannot run on {x.device.type} tensors of dtype {x.dtype}: {reason}. "
            f"Backends that can: {can} (or 'auto')")
    return get_backend(backend)
