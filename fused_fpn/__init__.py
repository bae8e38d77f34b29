"""fused_fpn: a Feature Pyramid Network whose top-down pathway runs as fused kernels.

    fpn = fused_fpn.FPN([256, 512, 1024, 2048], 256, extra_blocks=fused_fpn.LastLevelMaxPool())
    y = fused_fpn.lateral(x, weight, bias, top)   # conv1x1(x) + bias + nearest(top, size=x.shape[-2:])
    fused_fpn.available_backends()                # e.g. ['cpu', 'torch']
    model = fused_fpn.convert(detector)          # swap torchvision FPNs in place, weights shared
    torch.onnx.export(model, ...)                 # exports torchvision's graph (Conv, Resize, Add)
"""
from . import _ops
from ._onnx import translation_table as onnx_translation_table
from ._extension import cuda_built, extension_error, extension_loaded
from .backends import available_backends
from .convert import convert
from .extra_blocks import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7
from .fpn import FPN, lateral_params
from .functional import lateral
from .reference import lateral_reference, nearest_source_indices

_ops.register()

__version__ = "0.1.0"

__all__ = [
    "FPN", "convert", "ExtraFPNBlock", "LastLevelMaxPool", "LastLevelP6P7", "lateral", "available_backends",
    "lateral_reference", "nearest_source_indices", "lateral_params", "extension_loaded", "extension_error",
    "cuda_built", "onnx_translation_table",
]
