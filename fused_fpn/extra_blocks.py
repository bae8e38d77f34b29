"""Extra FPN blocks, compatible both ways with torchvision's.

They subclass torchvision's classes (same forward, same init, same state_dict keys), so
torchvision's ``FeaturePyramidNetwork`` accepts them and ``fused_fpn.FPN`` accepts torchvision's
own instances as they are. These blocks run eagerly (they are not part of the fused pathway).
"""
from torchvision.ops import feature_pyramid_network as _tv_fpn


class ExtraFPNBlock(_tv_fpn.ExtraFPNBlock):
    """Base class of the blocks appended after the FPN levels.

    forward(results, x, names) -> (results, names): ``results`` are the FPN outputs (finest
    first), ``x`` the raw backbone features (extra blocks see them too), ``names`` the output names.
    """


class LastLevelMaxPool(_tv_fpn.LastLevelMaxPool, ExtraFPNBlock):
    """Appends "pool" = max_pool2d(results[-1], kernel 1, stride 2, padding 0): a stride-2
    subsample of the coarsest output, ceil(H/2) x ceil(W/2)."""


class LastLevelP6P7(_tv_fpn.LastLevelP6P7, ExtraFPNBlock):
    """LastLevelP6P7(in_channels, out_channels) appends "p6" = conv3x3/2(x) and "p7" = conv3x3/2(relu(p6)),
    where x is P5 when in_channels == out_channels, else C5. Init: kaiming_uniform_(a=1), bias 0."""


__all__ = ["ExtraFPNBlock", "LastLevelMaxPool", "LastLevelP6P7"]
