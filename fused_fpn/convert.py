"""``fused_fpn.convert``: swap every torchvision FPN inside a model for a fused one, in place."""
from __future__ import annotations

import warnings

from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from .backends import check_name as check_backend_name
from .fpn import FPN, convertible


def convert(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replace, in place, every ``torchvision.ops.FeaturePyramidNetwork`` in ``model`` by a
    ``fused_fpn.FPN`` sharing the very same parameters and buffers; returns ``model``.

    Nothing is copied or re-initialised: weights, extra blocks, norm layers, train/eval mode,
    device, dtype, memory format and the parameter count and order stay as they are (torchvision's
    frozen-layer logic counts them). Idempotent: converting twice changes nothing more (a second
    call only updates ``backend``). If ``model`` itself is an FPN, the fused module is returned. An
    FPN held in several places (``m.a = m.b = fpn``) is replaced by one fused module in all of them.
    A subclass of torchvision's FPN (other than fused_fpn.FPN) is left as it is, with a warning:
    replacing it would drop its own methods; derive it from ``fused_fpn.FPN`` to fuse it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    check_backend_name(backend)   # also when the model holds no FPN
    if isinstance(model, FeaturePyramidNetwork):
        return _convert_one(model, "model", backend)
    converted = {}   # id(torchvision FPN) -> its replacement: one FPN held in two places stays one module
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FeaturePyramidNetwork):
                if id(child) not in converted:
                    path = f"{parent_name}.{name}" if parent_name else name
                    converted[id(child)] = (child, _convert_one(child, path, backend))
                setattr(parent, name, converted[id(child)][1])
    return model


def _convert_one(fpn: FeaturePyramidNetwork, path: str, backend: str) -> nn.Module:
    if convertible(fpn):
        return FPN.from_torchvision(fpn, backend=backend)
    warnings.warn(f"fused_fpn.convert: {path} is {type(fpn).__qualname__}, a subclass of torchvision's "
                  f"FeaturePyramidNetwork; left unfused (a fused_fpn.FPN in its place would drop the subclass's "
                  f"own methods, forward included). Derive {type(fpn).__qualname__} from fused_fpn.FPN to fuse it.",
                  UserWarning, stacklevel=3)
    return fpn
