"""``fused_fpn.convert``: swap every torchvision FPN inside a model for a fused one, in place."""
from __future__ import annotations

from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from .fpn import FPN


def convert(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replace, in place, every ``torchvision.ops.FeaturePyramidNetwork`` in ``model`` (subclasses
    too) by a ``fused_fpn.FPN`` sharing the very same parameters and buffers; returns ``model``.

    Nothing is copied or re-initialised: weights, extra blocks, norm layers, train/eval mode,
    device, dtype, memory format and the parameter count and order stay as they are (torchvision's
    frozen-layer logic counts them). Idempotent: converting twice changes nothing more (a second
    call only updates ``backend``). If ``model`` itself is an FPN, the fused module is returned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, FeaturePyramidNetwork):
        return FPN.from_torchvision(model, backend=backend)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FeaturePyramidNetwork):
                setattr(parent, name, FPN.from_torchvision(child, backend=backend))
    return model
