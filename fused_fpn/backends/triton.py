"""The "triton" backend: the fused Triton kernels of ``kernels/`` (installed as ``fused_fpn.kernels``).

Registered ops (the "fused_fpn" namespace, ``triton_`` names, separate from the C++ ops):

    fused_fpn::triton_lateral(Tensor x, Tensor weight, Tensor? bias, Tensor? top) -> Tensor
    fused_fpn::triton_lateral_backward(Tensor grad, Tensor x, Tensor weight, SymInt top_h,
        SymInt top_w, bool need_x, bool need_weight, bool need_bias, bool need_top)
        -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dtop)     (unneeded ones are empty [0])

On a GPU they are ``torch.library.triton_op`` s whose launches go through ``wrap_triton`` (torch.compile
and AOTInductor see the kernels; the op body is its own fake impl). Under TRITON_INTERPRET=1 (CPU
tensors, no GPU) they are ``torch.library.custom_op`` s with ``register_fake``: triton_op's fake-tensor
path and torch.compile fail there because the interpreter touches data pointers (DESIGN.md §4).
Autograd is registered on ``triton_lateral`` in both cases; its backward is ``triton_lateral_backward``
(under ``create_graph=True``, the unfused differentiable ``reference.lateral_backward_reference``).
Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is handled by ``lateral`` below, not by
the registered ops: called directly on dual tensors they would drop the tangents.

triton is imported, and the ops registered, when this module is imported and the backend can run (a
CUDA device is present or TRITON_INTERPRET=1 is set); without either, triton is never imported by
this module. TRITON_INTERPRET is read once, at import (``interpreting``).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD

from .._autocast import register_autocast_kernels
from .._checks import check_float_tensor, check_lateral_args, check_top_size
from .._layout import output_memory_format
from ..kernels.limits import MAX_PIXELS
from ..reference import lateral_backward_reference

NAME = "triton"
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRET_DTYPES = (torch.float32, torch.float16)

_REGISTERED = False
_MODE: Optional[str] = None  # "triton_op" or "custom_op" once registered
_triton_error: Optional[str] = None
_triton_checked = False


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


# Read once, at import: triton takes the variable when it is imported and when kernels are defined, so
# setting it later cannot make the interpreter run them (the launch fails inside triton).
_INTERPRET_AT_IMPORT = _interpret_env()


def interpreting() -> bool:
    """True when TRITON_INTERPRET was set when fused_fpn was imported (triton then runs kernels on CPU
    tensors)."""
    return _INTERPRET_AT_IMPORT


def _triton_import_error() -> Optional[str]:
    global _triton_checked, _triton_error
    if not _triton_checked:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any failure means: not usable
            _triton_error = f"triton cannot be imported ({exc!r})"
        _triton_checked = True
    return _triton_error


def unavailable_reason() -> Optional[str]:
    if not (interpreting() or torch.cuda.is_available()):
        if _interpret_env():
            return ("no CUDA device is available, and TRITON_INTERPRET=1 was set after fused_fpn was imported: "
                    "triton reads it when it is imported, so set it before importing fused_fpn (and triton)")
        return "no CUDA device is available (and TRITON_INTERPRET=1 is not set for the CPU interpreter)"
    return _triton_import_error()


def unsupported_reason(x: torch.Tensor) -> Optional[str]:
    if interpreting():
        if x.device.type != "cpu":
            return f"under TRITON_INTERPRET=1 the triton backend runs on CPU tensors, got device {x.device}"
        if x.dtype not in INTERPRET_DTYPES:
            return (f"under TRITON_INTERPRET=1 the triton backend supports {[str(d) for d in INTERPRET_DTYPES]} "
                    f"(the interpreter computes bfloat16 wrongly), got {x.dtype}")
        return None
    if x.device.type != "cuda":
        return f"the triton backend runs on CUDA tensors, got device {x.device}"
    if x.dtype not in GPU_DTYPES:
        return f"the triton backend supports dtypes {[str(d) for d in GPU_DTYPES]}, got {x.dtype}"
    return None


# ---- argument checks of the registered ops (they can be called directly, not only via lateral) ----

def _check_supported(name: str, t: torch.Tensor) -> None:
    reason = unsupported_reason(t)
    if reason is not None:
        raise ValueError(f"{name}: {reason}")


def check_forward_args(x, weight, bias, top) -> None:
    """ValueError/TypeError naming the argument unless the ops can run on these tensors."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [Cout, Cin] tensor for fused_fpn::triton_lateral, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    check_lateral_args(x, weight, bias, top)
    _check_supported("x", x)
    if x.shape[0] * x.shape[2] * x.shape[3] > MAX_PIXELS:
        raise ValueError(f"x has {x.shape[0] * x.shape[2] * x.shape[3]} pixels (N*H*W); the triton kernels index "
                         f"pixels with 32-bit integers, so N*H*W must be <= 2^31 - 2^20 = {MAX_PIXELS} (tile ends "
                         f"and split bounds stay below 2^31; element offsets are 64-bit)")


def check_backward_args(grad, x, weight, top_h, top_w) -> None:
    check_forward_args(x, weight, None, None)
    check_float_tensor("grad", grad)   # a dense floating tensor (a sparse one has no strides to launch with)
    if not isinstance(grad, torch.Tensor) or grad.dim() != 4 or tuple(grad.shape) != (
            x.shape[0], weight.shape[0], x.shape[2], x.shape[3]):
        raise ValueError(f"grad must be [N, Cout, H, W] = {(x.shape[0], weight.shape[0], x.shape[2], x.shape[3])}, "
                         f"got {tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__}")
    if grad.dtype != x.dtype or grad.device != x.device:
        raise TypeError(f"grad must have x's dtype and device ({x.dtype}, {x.device}), got {grad.dtype}, {grad.device}")
    check_top_size("fused_fpn::triton_lateral_backward", grad, top_h, top_w)


# ---- fake impls (custom_op mode; in triton_op mode the op body is its own fake) -------------------

def _lateral_fake(x, weight, bias, top):
    check_forward_args(x, weight, bias, top)   # as the op body does (a direct call on meta tensors, a trace)
    n, _, h, w = x.shape
    return x.new_empty((n, weight.shape[0], h, w)).contiguous(memory_format=output_memory_format(x))


def _backward_fake(grad, x, weight, top_h, top_w, need_x, need_weight, need_bias, need_top):
    check_backward_args(grad, x, weight, top_h, top_w)

    def empty():
        return grad.new_empty((0,))
    dx = x.new_empty(x.shape).contiguous(memory_format=output_memory_format(x)) if need_x else empty()
    dw = weight.new_empty(weight.shape) if need_weight else empty()
    db = grad.new_empty((grad.shape[1],)) if need_bias else empty()
    dtop = (grad.new_empty((grad.shape[0], grad.shape[1], top_h, top_w))
            .contiguous(memory_format=output_memory_format(grad)) if need_top else empty())
    return dx, dw, db, dtop


# ---- autograd ----------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    x, weight, bias, top = inputs
    # x and W are kept where eager's conv node keeps them: when x, W or bias requires grad. When only top
    # does (a frozen lateral conv), eager makes no conv node, and db / dtop read the incoming gradient
    # alone: neither is kept (nor version-checked, nor an inference tensor held)
    ctx.keeps_operands = any(ctx.needs_input_grad[:3])
    if ctx.keeps_operands:
        ctx.save_for_backward(x, weight)
    else:
        ctx.operand_shapes = (x.shape, weight.shape)
    ctx.top_hw = (top.shape[-2], top.shape[-1]) if top is not None else (0, 0)


def _saved_operands(ctx, grad):
    """(x, weight) as the forward saved them (unpacked, as eager's node does: a second backward without
    retain_graph, or x changed in place since, raises), or, where it kept neither (``_setup_context``),
    stand-ins of their shapes in grad's dtype and device (one element each, expanded: the backward op
    checks their shapes and launches nothing that reads them)."""
    if ctx.keeps_operands:
        return ctx.saved_tensors
    return tuple(grad.new_empty((1,) * len(shape)).expand(shape) for shape in ctx.operand_shapes)


def _backward_needs_graph(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the backward runs under ``create_graph=True`` and its gradients depend on tensors
    that require grad, i.e. they will be differentiated again (double backward)."""
    return torch.is_grad_enabled() and (grad.requires_grad or x.requires_grad or weight.requires_grad)


def _backward(ctx, grad):
    need_x, need_w, need_b, need_top = ctx.needs_input_grad
    if not (need_x or need_w or need_b or need_top):
        return None, None, None, None
    x, weight = _saved_operands(ctx, grad)
    if _backward_needs_graph(grad, x, weight):   # double backward: differentiable, unfused ops
        return lateral_backward_reference(grad, x, weight, ctx.top_hw, ctx.needs_input_grad)
    args = (grad, x, weight, ctx.top_hw[0], ctx.top_hw[1], need_x, need_w, need_b, need_top)
    if direct_launch_allowed(grad, x, weight):   # the op's body without the dispatcher (see below)
        dx, dw, db, dtop = _run_body(triton_lateral_backward, *args)
    else:
        dx, dw, db, dtop = torch.ops.fused_fpn.triton_lateral_backward(*args)
    return (dx if need_x else None, dw if need_w else None, db if need_b else None,
            dtop if need_top else None)


# ---- the registered ops' bodies (also run directly by plain eager calls: direct_launch_allowed) -----

def triton_lateral(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   top: Optional[torch.Tensor]) -> torch.Tensor:
    check_forward_args(x, weight, bias, top)
    from fused_fpn.kernels import lateral_launch as L
    return L.lateral_forward(x, weight, bias, top)


def triton_lateral_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, top_h: int,
                            top_w: int, need_x: bool, need_weight: bool, need_bias: bool,
                            need_top: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_backward_args(grad, x, weight, top_h, top_w)
    from fused_fpn.kernels import lateral_launch as L
    return L.lateral_backward(grad, x, weight, top_h, top_w, need_x, need_weight, need_bias, need_top)


def _run_body(body, *args):
    """An op's body called directly, launching its kernels as a triton_op's eager call does."""
    from fused_fpn.kernels import lateral_launch as L
    return L.run_directly(body, *args)


# ---- registration ------------------------------------------------------------------------------

def _register() -> None:
    """Register the ops once, as triton_op (GPU) or custom_op (interpreter), with their autograd and
    autocast kernels."""
    global _REGISTERED, _MODE
    if _REGISTERED:
        return
    if interpreting():
        fwd = torch.library.custom_op("fused_fpn::triton_lateral", mutates_args=())(triton_lateral)
        bwd = torch.library.custom_op("fused_fpn::triton_lateral_backward", mutates_args=())(
            triton_lateral_backward)
        fwd.register_fake(_lateral_fake)
        bwd.register_fake(_backward_fake)
        _MODE = "custom_op"
    else:
        fwd = torch.library.triton_op("fused_fpn::triton_lateral", mutates_args=())(triton_lateral)
        torch.library.triton_op("fused_fpn::triton_lateral_backward", mutates_args=())(triton_lateral_backward)
        _MODE = "triton_op"
    fwd.register_autograd(_backward, setup_context=_setup_context)
    register_autocast_kernels("fused_fpn::triton_lateral")
    _REGISTERED = True


def registration_mode() -> Optional[str]:
    """"triton_op" or "custom_op" once the ops are registered, else None."""
    return _MODE


def ops():
    """(torch.ops.fused_fpn.triton_lateral, torch.ops.fused_fpn.triton_lateral_backward), registered."""
    _register()
    return torch.ops.fused_fpn.triton_lateral.default, torch.ops.fused_fpn.triton_lateral_backward.default


def _forward_ad_tangents(tensors):
    """The forward-mode AD tangents of ``tensors`` (None for none) inside a dual level
    (torch.autograd.forward_ad, torch.func.jvp), or None when no input has one."""
    if fwAD._current_level < 0:
        return None
    tangents = [None if t is None else fwAD.unpack_dual(t).tangent for t in tensors]
    return tangents if any(t is not None for t in tangents) else None


def _lateral_with_tangent(x, weight, bias, top, tangents):
    """The op on dual inputs: y' = lateral(x', W, b', top') + lateral(x, W') (the fused op again);
    a custom op alone would drop the tangents."""
    x_p, w_p = fwAD.unpack_dual(x).primal, fwAD.unpack_dual(weight).primal
    x_t, w_t, b_t, top_t = tangents
    op = torch.ops.fused_fpn.triton_lateral
    y = op(x, weight, bias, top)
    y_t = None
    if x_t is not None or b_t is not None or top_t is not None:
        y_t = op(torch.zeros_like(x_p) if x_t is None else x_t, w_p, b_t, top_t)
    if w_t is not None:
        term = op(x_p, w_t, None, None)
        y_t = term if y_t is None else y_t + term
    return fwAD.make_dual(y, y_t.contiguous(memory_format=output_memory_format(x_p)))


# ---- direct launches: the registered ops' bodies without the dispatcher, in plain eager calls --------
#
# Going through torch.ops.fused_fpn.triton_lateral costs a plain eager call as much host time as the
# launcher itself (the dispatcher's Python custom-op layer: ~20 us of ~45 on the dev machine, JIT
# launch stubbed; benchmarks/launch_overhead.py), and a launch-bound eager FPN pays it per level.
# Nothing but the dispatcher would see the op in such a call, so there the backend runs the op's body
# itself (same checks, same launcher, same kernels, so the same numbers). Everything that must see
# the op (autograd, torch.compile / export / make_fx traces, TorchScript tracing and the ONNX export
# built on it, torch_dispatch and torch_function modes such as FlopCounterMode, tensor subclasses,
# functorch transforms, the profiler's op rows) gets the registered op, as before.

def _plain_tensor(t) -> bool:
    """None, or a torch.Tensor / Parameter without the negative bit (``-t`` of a view, ``.conj().imag``:
    the dispatcher's fallback materializes it before an op's body runs; the kernels would read the
    memory as it is)."""
    return t is None or ((type(t) is torch.Tensor or type(t) is torch.nn.Parameter) and not t.is_neg())


_FUNCTIONALIZE = torch._C.DispatchKey.Functionalize


def direct_launch_allowed(*tensors) -> bool:
    """True when a call on ``tensors`` (None for absent ones) may run the registered op's body
    directly: an eager call (not traced by torch.compile or TorchScript, no dispatch or torch_function
    mode, no functorch transform or functionalization, profiler off) on plain tensors or Parameters
    (no negative bit), none of which requires grad while grad mode is on (autograd records the op's
    node). Not seen by the lane: RecordFunction observers registered globally rather than by the
    profiler (an ExecutionTraceObserver started alone), and kernels or autocast rules a user
    registers on the ops with torch.library (call torch.ops.fused_fpn.triton_lateral for those)."""
    if torch.compiler.is_compiling():   # first: dynamo folds it, so it never traces the checks below
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._get_tracing_state() is not None or torch._C._are_functorch_transforms_active()
            or torch._C._dispatch_tls_is_dispatch_key_included(_FUNCTIONALIZE)
            or torch._C._autograd._profiler_enabled()):
        return False
    return all(_plain_tensor(t) for t in tensors)


def lateral(x, weight, bias, top):
    """The backend entry point (inputs validated by fused_fpn.lateral; weight is [Cout, Cin]): the
    registered op, or its body directly where nothing but the dispatcher would see it
    (``direct_launch_allowed``)."""
    _register()
    tangents = _forward_ad_tangents((x, weight, bias, top))
    if tangents is not None:
        return _lateral_with_tangent(x, weight, bias, top, tangents)
    if direct_launch_allowed(x, weight, bias, top):
        return _run_body(triton_lateral, x, weight, bias, top)
    return torch.ops.fused_fpn.triton_lateral(x, weight, bias, top)


# Register the ops at import when this backend can run (a GPU is present, or the interpreter is
# on): a first registration inside a torch.compile'd region would be a graph break.
if unavailable_reason() is None:
    _register()
