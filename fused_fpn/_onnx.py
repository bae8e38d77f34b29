"""ONNX export: while ``torch.onnx.export`` runs, fused_fpn exports torchvision's own graph.

ONNX has no fused lateral op, and ONNX runtimes cannot run fused_fpn's kernels (a ``fused_fpn::``
node in an ONNX file would be an op no runtime knows). So while either exporter runs
(``dynamo=True``, the default, and the TorchScript one, ``dynamo=False``), every lateral is
torchvision's unfused computation,

    y = conv2d(x, W[:, :, None, None], b) + interpolate(top, size=x.shape[-2:], mode="nearest")

which the exporters translate to ONNX Conv, Resize (nearest, asymmetric, floor) and Add, as they do
for ``torchvision.ops.FeaturePyramidNetwork``: a converted model exports the same graph, and an
ONNX runtime gives the same numbers, as the unconverted one. ``backends.select`` returns this module
(for every backend name) while exporting; ``FPN`` then calls each lateral block itself, as
torchvision does (so a norm layer is exported as torchvision's is: the fused path's BatchNorm folding
is not used; the exporters fold an eval-mode BatchNorm into the Conv themselves, for both).

Outside ONNX export nothing changes (``torch.export.export`` and ``torch.compile`` keep the fused op).
The exporters' flags are process-wide (as ``torch.onnx.is_in_onnx_export``): a forward run by another
thread while one thread exports runs unfused too. A module traced before the export
(``torch.jit.trace``, ``torch.export.export``) holds the fused op already: export the module itself, or
pass ``translation_table()`` to the dynamo exporter with the ``torch.export`` program.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

NAME = "onnx-export"

try:   # the exporters' own flags: two attribute reads (torch.onnx.is_in_onnx_export imports both, ~2 us)
    from torch.onnx._internal.exporter import _flags as _dynamo_exporter_flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS as _torchscript_exporter_globals
    _dynamo_exporter_flags._is_onnx_exporting, _torchscript_exporter_globals.in_onnx_export   # what is read
except (ImportError, AttributeError):   # another torch layout: the public function
    _dynamo_exporter_flags = _torchscript_exporter_globals = None


def exporting() -> bool:
    """True while ``torch.onnx.export`` (either exporter) runs.

    The flags are read directly, not through ``torch.onnx.is_in_onnx_export``: besides being cheaper,
    torch.compile's tracer takes that function as the constant False, so a strict ``torch.export``
    inside the dynamo exporter (its fallback when the non-strict one fails) would miss the export.
    The TorchScript exporter's flag is a property the tracer refuses to call (a graph break); it
    traces with torch.jit.trace, never with the tracer, so a trace skips it."""
    if _dynamo_exporter_flags is None:
        return torch.onnx.is_in_onnx_export()
    if _dynamo_exporter_flags._is_onnx_exporting:
        return True
    return not torch.compiler.is_compiling() and _torchscript_exporter_globals.in_onnx_export


def unavailable_reason() -> Optional[str]:
    return None


def unsupported_reason(x: torch.Tensor) -> Optional[str]:
    return None


def lateral(x, weight, bias, top):
    """torchvision's lateral step, unfused (x [N, Cin, H, W], weight [Cout, Cin], bias [Cout] or None,
    top [N, Cout, Ht, Wt] or None): ONNX Conv (+ Resize + Add)."""
    y = F.conv2d(x, weight[:, :, None, None], bias)
    if top is None:
        return y
    return y + F.interpolate(top, size=y.shape[-2:], mode="nearest")


def _lateral_translation(x, weight, bias=None, top=None):
    """ONNX of one fused lateral node (onnxscript, traced): Conv(x, W[:, :, None, None], b), plus
    Resize(top, sizes = [N, Cout, H, W], nearest, asymmetric, floor) when there is a top: the nodes
    the exporters make of torchvision's conv2d and ``F.interpolate(size=..., mode="nearest")``."""
    from onnxscript import opset18 as op

    w = op.Unsqueeze(weight, op.Constant(value_ints=[2, 3]))
    y = op.Conv(x, w) if bias is None else op.Conv(x, w, bias)
    if top is None:
        return y
    sizes = op.Concat(op.Shape(top, start=0, end=2), op.Shape(x, start=2), axis=0)
    up = op.Resize(top, None, None, sizes, mode="nearest", coordinate_transformation_mode="asymmetric",
                   nearest_mode="floor")
    return op.Add(y, up)


def translation_table() -> dict:
    """``{fused op: its ONNX translation}`` for ``torch.onnx.export(program, custom_translation_table=...)``
    of a ``torch.export`` program that already holds fused ops (``fused_fpn::lateral``, and
    ``fused_fpn::triton_lateral`` where the triton backend is registered). Exporting the module itself
    needs no table (see above). The translations are written with onnxscript, which the dynamo
    exporter needs anyway. Only the ops registered in this process are keys (``fused_fpn::lateral``
    needs the native extension ``fused_fpn._C``; without it the table may be empty)."""
    return {getattr(torch.ops.fused_fpn, name).default: _lateral_translation
            for name in ("lateral", "triton_lateral") if hasattr(torch.ops.fused_fpn, name)}
