"""``fused_fpn.convert``: swap every torchvision FPN inside a model for a fused one, in place."""
from __future__ import annotations

import warnings

import torch
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
    An FPN wrapped by ``torch.compile(fpn)`` is replaced inside the wrapper, which then compiles the
    fused module. A subclass of torchvision's FPN (other than fused_fpn.FPN) is left as it is, with a
    warning: replacing it would drop its own methods; derive it from ``fused_fpn.FPN`` to fuse it. So
    is a TorchScript FPN (``torch.jit.script`` / ``trace``), which holds no Python module to replace.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    check_backend_name(backend)   # also when the model holds no FPN
    if isinstance(model, FeaturePyramidNetwork):
        return _convert_one(model, "model", backend)
    _warn_scripted_fpns(model)
    converted = {}   # id(torchvision FPN) -> its replacement: one FPN held in two places stays one module
    for parent_name, parent in list(model.named_modules()):
        # every name of each child (named_children yields a module once, under its first name)
        for name, child in list(parent._modules.items()):
            if isinstance(child, FeaturePyramidNetwork):
                if id(child) not in converted:
                    path = f"{parent_name}.{name}" if parent_name else name
                    converted[id(child)] = (child, _convert_one(child, path, backend))
                if converted[id(child)][1] is not child:
                    setattr(parent, name, converted[id(child)][1])
                    _rebind_compiled_wrapper(parent, name)
    return model


def _rebind_compiled_wrapper(parent: nn.Module, name: str) -> None:
    """``torch.compile(module)`` returns a wrapper (dynamo's OptimizedModule) whose ``forward`` was bound
    to the wrapped module's call when it was made: once its ``_orig_mod`` is replaced, bind it again,
    or it goes on running the torchvision FPN, unfused."""
    if name != "_orig_mod":
        return
    from torch._dynamo.eval_frame import OptimizedModule
    if not isinstance(parent, OptimizedModule):
        return
    if hasattr(parent, "_initialize"):
        parent._initialize()
    else:   # another torch: say so rather than run torchvision's forward silently
        warnings.warn("fused_fpn.convert: a torch.compile(...) wrapper holds the converted FPN, and this torch "
                      "gives no way to bind the wrapper to it again: it still runs torchvision's FPN. Convert "
                      "before torch.compile.", UserWarning, stacklevel=3)


def _warn_scripted_fpns(model: nn.Module) -> None:
    """A warning naming each TorchScript FeaturePyramidNetwork in ``model``: a scripted or traced
    module holds no Python FPN to replace, so it stays unfused."""
    paths = [path or "model" for path, module in model.named_modules()
             if isinstance(module, torch.jit.ScriptModule)
             and getattr(module, "original_name", None) == "FeaturePyramidNetwork"]
    if paths:
        warnings.warn(f"fused_fpn.convert: {', '.join(paths)} is a TorchScript FeaturePyramidNetwork "
                      f"(torch.jit.script / torch.jit.trace), left unfused: convert the Python model instead (a "
                      f"converted model runs under torch.compile and torch.export, not torch.jit.script)",
                      UserWarning, stacklevel=3)


def _convert_one(fpn: FeaturePyramidNetwork, path: str, backend: str) -> nn.Module:
    if convertible(fpn):
        return FPN.from_torchvision(fpn, backend=backend)
    warnings.warn(f"fused_fpn.convert: {path} is {type(fpn).__qualname__}, a subclass of torchvision's "
                  f"FeaturePyramidNetwork; left unfused (a fused_fpn.FPN in its place would drop the subclass's "
                  f"own methods, forward included). Derive {type(fpn).__qualname__} from fused_fpn.FPN to fuse it.",
                  UserWarning, stacklevel=3)
    return fpn
