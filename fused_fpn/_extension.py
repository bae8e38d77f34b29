"""Loads the native extension ``fused_fpn._C`` if it was built; the package works without it."""
from __future__ import annotations

import importlib
from typing import Optional

_C = None
_LOAD_ERROR: Optional[str] = None

try:
    _C = importlib.import_module("fused_fpn._C")
except Exception as exc:  # noqa: BLE001 - missing or broken binary: only the torch backend is left
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def extension_loaded() -> bool:
    """True when ``fused_fpn._C`` (and so ``torch.ops.fused_fpn.*``) is available."""
    return _C is not None


def extension_error() -> Optional[str]:
    """Why ``_C`` could not be loaded, or None."""
    return _LOAD_ERROR


def cuda_built() -> bool:
    """True when the CUDA kernels of ``csrc/cuda`` were compiled into ``_C``."""
    return _C is not None and bool(getattr(_C, "with_cuda", 0))
