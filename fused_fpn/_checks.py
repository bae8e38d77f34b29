"""Argument checks with messages that name the argument and what was expected.

Every public entry point validates here, before any kernel runs, so bad input raises a Python
exception (TypeError / ValueError) instead of a crash, a hang or a wrong answer.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch


def run_check(check, *args):
    """``check(*args)``. Under ``torch.jit.trace`` (which the TorchScript ONNX exporter,
    ``torch.onnx.export(..., dynamo=False)``, runs) sizes are traced values, and each comparison of
    them warns that the trace takes it as a constant; a check only raises, and the traced graph does
    not depend on it, so there its TracerWarnings are silenced."""
    if not torch.jit.is_tracing():
        return check(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return check(*args)


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_float_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested or t.layout != torch.strided:
        kind = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{name} must be a dense (torch.strided) tensor, got {kind}")
    if t.dtype not in FLOAT_DTYPES:   # float8 and other floating dtypes have no conv2d to match
        raise TypeError(f"{name} must have a floating-point dtype (float16, bfloat16, float32, float64), got {t.dtype}")


def check_top_size(op: str, grad: torch.Tensor, top_h, top_w) -> None:
    """The backward ops' rule for (top_h, top_w): both >= 1 (a top) or both 0 (no top); one of them 0
    only when grad is empty (a top without pixels under an output without pixels)."""
    if top_h < 0 or top_w < 0 or ((top_h == 0) != (top_w == 0) and grad.numel() > 0):
        raise ValueError(f"{op}: top_h and top_w must both be positive (or both 0 for no top; one of them 0 only "
                         f"when the gradient is empty), got {top_h} and {top_w}")


def check_lateral_args(x, weight, bias: Optional[torch.Tensor], top: Optional[torch.Tensor],
                       top_any_dtype: bool = False) -> torch.Tensor:
    """Validate ``lateral``'s arguments; returns weight as [Cout, Cin] (a view, never a copy).
    ``top_any_dtype``: top may have another floating dtype than x (autocast: eager adds it promoted)."""
    check_float_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, Cin, H, W], got {_desc(x)}")
    n, cin, h, w = x.shape
    check_float_tensor("weight", weight)
    if weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1):
        weight = weight.view(weight.shape[0], weight.shape[1])
    if weight.dim() != 2 or weight.shape[1] != cin:
        raise ValueError(f"weight must be [Cout, Cin] or [Cout, Cin, 1, 1] with Cin = x.shape[1] = {cin}, "
                         f"got {_desc(weight)}")
    cout = weight.shape[0]
    tensors = [("weight", weight)]
    if bias is not None:
        check_float_tensor("bias", bias)
        if bias.dim() != 1 or bias.shape[0] != cout:
            raise ValueError(f"bias must be 1-D [Cout] with Cout = weight.shape[0] = {cout}, got {_desc(bias)}")
        tensors.append(("bias", bias))
    if top is not None:
        check_float_tensor("top", top)
        if top.dim() != 4 or top.shape[0] != n or top.shape[1] != cout:
            raise ValueError(f"top must be 4-D [N, Cout, Ht, Wt] with N = x.shape[0] = {n} and "
                             f"Cout = weight.shape[0] = {cout}, got {_desc(top)}")
        # every output pixel gathers from top (with Cin == 0 too: the output is bias + top)
        if n * h * w * cout > 0 and (top.shape[2] == 0 or top.shape[3] == 0):
            raise ValueError(f"top must have a non-empty spatial size [Ht >= 1, Wt >= 1], got {_desc(top)}")
        tensors.append(("top", top))
    for name, t in tensors:
        if t.device != x.device:
            raise ValueError(f"{name} must be on the same device as x ({x.device}), got {_desc(t)}")
        if t.dtype != x.dtype and not (top_any_dtype and name == "top"):
            raise TypeError(f"{name} must have the same dtype as x ({x.dtype}), got {_desc(t)}")
    return weight
