"""``fused_fpn.FPN``: drop-in ``torchvision.ops.FeaturePyramidNetwork`` with a fused top-down pathway.

It subclasses torchvision's module, so the constructor checks (plus ``backend`` and
``out_channels >= 1``), the init (kaiming_uniform_(a=1), bias 0), the submodules and state_dict keys
(``inner_blocks.{i}.0.weight`` ...), the state_dict loading (version-1 dicts upgraded) and
``isinstance(m, FeaturePyramidNetwork)`` are torchvision's own. Only ``forward`` differs: each
level's lateral 1x1 conv + nearest upsample + add is one fused op (the backend's ``lateral``: one
kernel launch on triton, and on cuda but for its split-K GEMM + epilogue pair; on cpu, ATen's
GEMM and a parallel epilogue per cache-sized tile). A level without a top map (the coarsest) has
nothing to gather: on cpu and cuda, for a dense x, it is ATen's conv2d.

Norm layers: a frozen or eval-mode BatchNorm after the 1x1 conv is folded into the fused op's
weight and bias (no extra pass). Any other norm (GroupNorm, training-mode BatchNorm, ...), and a
block whose call would do more than conv (+ norm) (hooks, as pruning, legacy weight_norm and
quantization observers register; a conv or norm subclass with its own forward, as QAT's), takes the
unfused path: ``block(x) + F.interpolate(top, size, mode="nearest")``, exactly as torchvision.
So does every level while ``torch.onnx.export`` runs (``fused_fpn._onnx``): the ONNX file gets
torchvision's graph; and ``torch.fx.symbolic_trace`` records torchvision's forward (``_symbolic``).
"""
from __future__ import annotations

import operator
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import FrozenBatchNorm2d

from . import _onnx
from . import backends as _backends
from ._autocast import (autocast_dtype, autocast_float64_error, autocast_result_dtype, autocast_tensor,
                        kernels_skipped)
from ._checks import check_float_tensor, run_check


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks of its own: forward / backward hooks, and the
    forward pre-hooks of legacy weight_norm, pruning, quantization observers (global ones: torch's
    ``_has_any_global_hook``)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _fusable_conv(conv: nn.Module) -> bool:
    """A 1x1 convolution whose call is exactly F.conv2d(x, conv.weight, conv.bias): nn.Conv2d's own
    forward (subclasses such as QAT or weight-standardized convs override it; a parametrized conv,
    torch.nn.utils.parametrize, keeps it and computes .weight) and no hooks."""
    return (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward
            and type(conv)._conv_forward is nn.Conv2d._conv_forward and not _has_hooks(conv)
            and tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1)
            and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _batchnorm_scale_shift(norm: nn.Module) -> Optional[Tuple[Tensor, Tensor]]:
    """(scale, shift) with norm(y) = y * scale + shift, for norms that are affine maps (the classes'
    own forward, no hooks); else None."""
    if _has_hooks(norm):
        return None
    if isinstance(norm, FrozenBatchNorm2d) and type(norm).forward is FrozenBatchNorm2d.forward:
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        return scale, norm.bias - norm.running_mean * scale
    if (isinstance(norm, nn.BatchNorm2d) and type(norm).forward is nn.BatchNorm2d.forward and not norm.training
            and norm.running_mean is not None):
        inv_std = torch.rsqrt(norm.running_var + norm.eps)
        scale = inv_std if norm.weight is None else norm.weight * inv_std
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias
        return scale, shift
    return None


def lateral_params(block: nn.Module) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
    """(weight [Cout, Cin, 1, 1], bias [Cout] or None) of a lateral block the fused op can run,
    folding an affine norm; None when the block must run unfused: anything whose call would do more
    than conv (+ norm), such as hooks (global ones too: they would see each block's call), an
    overridden forward, a third layer."""
    if _nn_module._has_any_global_hook():
        return None
    if isinstance(block, nn.Sequential):   # torchvision's Conv2dNormActivation is one
        if type(block).forward is not nn.Sequential.forward or _has_hooks(block):
            return None
        layers = list(block)
    else:
        layers = [block]
    if not layers or not _fusable_conv(layers[0]):
        return None
    conv = layers[0]
    if len(layers) == 1:
        return conv.weight, conv.bias
    if len(layers) > 2:
        return None
    folded = _batchnorm_scale_shift(layers[1])
    if folded is None:
        return None
    scale, shift = folded
    weight = conv.weight * scale.to(conv.weight.dtype)[:, None, None, None]
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return weight, bias.to(conv.weight.dtype)


def _symbolic(x) -> bool:
    """True when ``x`` (the FPN's input dict) or one of its maps is a ``torch.fx.Proxy``: the module is
    being traced by ``torch.fx.symbolic_trace`` (FX graph mode quantization, FX graph surgery), which
    records Python-level calls on proxies and cannot run the fused op's checks and backend choice."""
    if isinstance(x, torch.fx.Proxy):
        return True
    return isinstance(x, dict) and any(isinstance(v, torch.fx.Proxy) for v in x.values())


def convertible(fpn: nn.Module) -> bool:
    """Whether a fused_fpn.FPN can stand in for ``fpn``: torchvision's FPN itself, or a fused one
    (a subclass of torchvision's has methods of its own that a fused_fpn.FPN would drop)."""
    return isinstance(fpn, FPN) or type(fpn) is FeaturePyramidNetwork


# Module containers that from_torchvision gives the fused module its own copy of (setattr / del on one
# module must not change the other); everything else in ``__dict__`` (the hook dicts) is shared.
_OWN_CONTAINERS = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set")


def _compiled_again(compiled, call):
    """``call`` compiled as ``compiled`` (what ``Module.compile(*args, **kwargs)`` stored) was: with the
    same dynamo context, so the same backend, mode and options. torch keeps the options only in that
    context, the compiled function's closure; where it is not found (another torch), ``torch.compile``'s
    defaults, with a warning."""
    try:
        from torch._dynamo.eval_frame import _TorchDynamoContext
    except ImportError:
        _TorchDynamoContext = ()
    for cell in getattr(compiled, "__closure__", None) or ():
        context = cell.cell_contents
        if isinstance(context, _TorchDynamoContext):
            return context(call)
    warnings.warn("fused_fpn: the torchvision FPN was compiled with Module.compile(...), whose options this "
                  "torch does not let fused_fpn read; the fused FPN is compiled with torch.compile's defaults: "
                  "call .compile(...) on it to choose others", UserWarning, stacklevel=4)
    return torch.compile(call)


def _int_argument(value, name: str) -> int:
    """``value`` as an int (anything with ``__index__`` but a bool), else a TypeError naming ``name``."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return operator.index(value)


def _check_out_channels(out_channels) -> None:
    """out_channels >= 1: torchvision's FPN takes 0 and then fails in its first forward, in ATen's
    conv2d, with a message that names no argument."""
    count = _int_argument(out_channels, "out_channels")
    if count < 1:
        raise ValueError(f"out_channels must be >= 1 (the channels of every output level), got {count}")


def _check_in_channels_list(in_channels_list) -> List[int]:
    """in_channels_list as a list of ints >= 1 (0 gets torchvision's own error): torchvision's FPN
    fails on a negative, float, bool or string entry inside ATen or str.format, with a message that
    names no argument."""
    if isinstance(in_channels_list, (str, bytes)) or not hasattr(in_channels_list, "__iter__"):
        raise TypeError(f"in_channels_list must be a list of ints (the channels of each input level, finest "
                        f"first), got {type(in_channels_list).__name__}")
    counts = list(in_channels_list)
    for i, count in enumerate(counts):
        if _int_argument(count, f"in_channels_list[{i}]") < 0:
            raise ValueError(f"in_channels_list[{i}] must be >= 1, got {count}")
    return counts


def _in_channels(block: nn.Module) -> Optional[int]:
    """The channels a lateral block takes, or None when it does not say: no ``in_channels``, or a lazy
    module (``nn.LazyConv2d``) not yet materialized, whose 0 means "inferred at the first call"."""
    first = block[0] if isinstance(block, nn.Sequential) and len(block) > 0 else block
    if isinstance(first, nn.modules.lazy.LazyModuleMixin) and first.has_uninitialized_params():
        return None
    return getattr(first, "in_channels", None)


class FPN(FeaturePyramidNetwork):
    """FPN(in_channels_list, out_channels, extra_blocks=None, norm_layer=None, *, backend="auto").

    Same constructor, state_dict and forward contract as ``torchvision.ops.FeaturePyramidNetwork``:
    forward(x: dict[str, Tensor [N, C_i, H_i, W_i]], finest first) -> OrderedDict of
    [N, out_channels, H_i, W_i] with the same names, then the extra blocks' outputs.
    ``backend`` picks the lateral kernel: "auto", "torch", "cpu", "triton" or "cuda".
    """

    def __init__(self, in_channels_list: List[int], out_channels: int, extra_blocks=None,
                 norm_layer=None, *, backend: str = "auto"):
        _backends.check_name(backend)
        _check_out_channels(out_channels)
        super().__init__(_check_in_channels_list(in_channels_list), out_channels, extra_blocks=extra_blocks, norm_layer=norm_layer)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    @classmethod
    def from_torchvision(cls, fpn: FeaturePyramidNetwork, *, backend: str = "auto") -> "FPN":
        """A fused FPN that shares ``fpn``'s submodules, parameters and buffers (no copies).

        Extra blocks, norm layers, train/eval mode, device, dtype, memory format and the parameter
        order are those of ``fpn``; its hooks are shared (a handle taken on ``fpn`` still removes its
        hook). An ``fpn`` compiled with ``fpn.compile(...)`` gives a fused module compiled with the
        same options (``_compiled_again``). A fused_fpn.FPN is returned as it is (backend updated).
        """
        if not isinstance(fpn, FeaturePyramidNetwork):
            raise TypeError(f"from_torchvision expects a torchvision.ops.FeaturePyramidNetwork, got {type(fpn).__name__}")
        if not convertible(fpn):
            raise TypeError(
                f"from_torchvision converts torchvision.ops.FeaturePyramidNetwork itself, got its subclass "
                f"{type(fpn).__qualname__}: a fused_fpn.FPN in its place would drop the subclass's own methods "
                f"(forward included). Derive {type(fpn).__qualname__} from fused_fpn.FPN instead (same constructor "
                f"and state_dict keys) to fuse it.")
        _backends.check_name(backend)
        if isinstance(fpn, FPN):
            fpn.backend = backend
            return fpn
        new = cls.__new__(cls)
        state = dict(fpn.__dict__)
        for key in _OWN_CONTAINERS:   # fresh containers, the very same modules/tensors inside
            if key in state:
                state[key] = type(state[key])(state[key])
        # The hook dicts stay shared: a RemovableHandle taken on fpn holds a weak reference to them,
        # so handle.remove() keeps working on the fused module. A compiled call (fpn.compile()) runs
        # fpn's own call, never this module's forward nor its new hooks: compiled again, for this module.
        compiled = state.pop("_compiled_call_impl", None)
        new.__dict__.update(state)
        new.backend = backend
        if compiled is not None:
            new._compiled_call_impl = _compiled_again(compiled, new._call_impl)
        return new

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "fused_fpn.FPN does not support torch.jit.script (its fused ops are torch.library custom ops "
            "called from Python). Use torch.compile(model) or torch.export.export(model, ...) instead, "
            "or script the model before fused_fpn.convert().")

    def _overrides_inner_blocks(self) -> bool:
        """Whether a subclass overrides torchvision's ``get_result_from_inner_blocks`` (the lateral
        block's call, which the fused op replaces): its forward is then torchvision's, unfused."""
        return type(self).get_result_from_inner_blocks is not FeaturePyramidNetwork.get_result_from_inner_blocks

    def _check_features(self, x, inner_blocks: List[nn.Module]
                        ) -> Tuple[List[str], List[Tensor], Optional[torch.dtype]]:
        """(names, feature maps, the autocast dtype in force or None), after checking the maps."""
        if not isinstance(x, dict) or len(x) == 0:
            raise TypeError(f"FPN input must be a non-empty dict[str, Tensor] of feature maps (finest first), "
                            f"got {type(x).__name__}" + (" (empty)" if isinstance(x, dict) else ""))
        names, feats = list(x.keys()), list(x.values())
        if len(feats) != len(inner_blocks):
            raise ValueError(f"FPN was built for {len(inner_blocks)} feature maps, got {len(feats)} "
                             f"({names})")
        ref, cast = None, None
        for i, (name, t) in enumerate(zip(names, feats)):
            check_float_tensor(f"x[{name!r}]", t)
            if i == 0:
                cast = autocast_dtype(t.device.type)
            if t.dim() != 4:
                raise ValueError(f"x[{name!r}] must be 4-D [N, C, H, W], got shape {tuple(t.shape)}")
            cin = _in_channels(inner_blocks[i])
            if cin is not None and t.shape[1] != cin:
                raise ValueError(f"x[{name!r}] (level {i}) must have {cin} channels, got shape {tuple(t.shape)}")
            if ref is None:
                ref = (name, t)
                continue
            rname, r = ref
            if t.shape[0] != r.shape[0]:
                raise ValueError(f"all feature maps must have one batch size: x[{rname!r}] has {r.shape[0]}, "
                                 f"x[{name!r}] has {t.shape[0]}")
            if autocast_result_dtype(t.dtype, cast) != autocast_result_dtype(r.dtype, cast):   # as the convs see them
                under = f" (under autocast to {cast}: float32 / float16 / bfloat16 are cast to it)" if cast else ""
                raise TypeError(f"all feature maps must have one dtype{under}: x[{rname!r}] is {r.dtype}, "
                                f"x[{name!r}] is {t.dtype}")
            if t.device != r.device:
                raise ValueError(f"all feature maps must be on one device: x[{rname!r}] is on {r.device}, "
                                 f"x[{name!r}] is on {t.device}")
        for i in range(len(feats) - 1):   # level i adds the upsampled level i + 1: it needs pixels
            fine, coarse = feats[i], feats[i + 1]
            if fine.shape[0] * fine.shape[2] * fine.shape[3] > 0 and coarse.shape[2] * coarse.shape[3] == 0:
                raise ValueError(f"x[{names[i + 1]!r}] has no pixels (shape {tuple(coarse.shape)}), so there is "
                                 f"nothing to upsample into the finer level x[{names[i]!r}] (shape "
                                 f"{tuple(fine.shape)}); every FPN level needs H, W >= 1")
        for name, t in zip(names, feats):   # (batch 0 runs: each level is [0, C, H, W] out)
            if t.shape[2] == 0 or t.shape[3] == 0:
                raise ValueError(f"x[{name!r}] has an empty spatial size (shape {tuple(t.shape)}): every FPN level "
                                 f"needs H, W >= 1 (torchvision's FPN fails inside its convolutions there: a 1x1 "
                                 f"or 3x3 convolution cannot run on an empty map)")
        return names, feats, cast

    @staticmethod
    def _lateral(block: nn.Module, x: Tensor, top: Optional[Tensor], impl, cast: Optional[torch.dtype]) -> Tensor:
        """One level's lateral ``block`` + nearest(top): the fused op of backend module ``impl`` (x the
        feature map as the caller passed it, top already in the autocast dtype ``cast`` if any), or the
        unfused torchvision computation (also the graph an ONNX export gets: ``impl`` is then
        ``fused_fpn._onnx``), whose block gets x uncast, as in torchvision: its hooks see x's dtype, and
        autocast casts for its conv alone."""
        params = None if impl is _onnx else lateral_params(block)
        if params is None:  # unfused path (GroupNorm, training-mode BatchNorm, custom blocks, ONNX export)
            y = block(x)
            return y if top is None else y + F.interpolate(top, size=y.shape[-2:], mode="nearest")
        x = autocast_tensor(x, cast)   # (eager conv2d's cast, None: x itself)
        weight, bias = params
        # the op's own checks would name "weight" or "bias", which the caller never passed (and the
        # unfused conv2d takes a bias on the meta device next to CPU tensors, and reads garbage)
        for what, param in (("weights", weight), ("biases", bias)):
            if param is not None and param.device != x.device:
                raise ValueError(f"the FPN's {what} are on {param.device}, the feature maps on {x.device}: move the "
                                 f"module or the inputs to one device")
        if bias is not None and bias.dtype != weight.dtype:
            raise TypeError(f"the FPN's lateral bias has dtype {bias.dtype}, its weight {weight.dtype}: convert the "
                            f"module to one dtype")
        if cast is not None:
            weight, bias = autocast_tensor(weight, cast), autocast_tensor(bias, cast)
            if x.dtype != weight.dtype:   # one side float64, which autocast leaves as it is
                side, other = ("feature maps", "FPN's weights") if x.dtype == torch.float64 else \
                    ("FPN's weights", "feature maps")
                raise autocast_float64_error(f"the {side} are", f"the {other}", cast)
        elif weight.dtype != x.dtype:
            raise TypeError(f"the FPN's weights have dtype {weight.dtype}, the feature maps {x.dtype}: convert the "
                            f"module or the inputs to one dtype (or run under torch.autocast)")
        # fused_fpn.lateral without its per-call argument checks and backend selection: the feature
        # maps were checked once (_check_features), the weights just above (shapes: the module's own
        # 1x1 convs), and one backend serves every level.
        with kernels_skipped(cast):
            return impl.lateral(x, weight.flatten(1), bias, top)

    def forward(self, x: Dict[str, Tensor]) -> Dict[str, Tensor]:
        if _symbolic(x) or self._overrides_inner_blocks():
            # torch.fx.symbolic_trace records torchvision's graph (its modules, interpolate, add); a
            # subclass's own get_result_from_inner_blocks is a lateral computation the fused op cannot run
            return FeaturePyramidNetwork.forward(self, x)
        inner_blocks, layer_blocks = list(self.inner_blocks), list(self.layer_blocks)
        names, feats, cast = run_check(self._check_features, x, inner_blocks)
        # every level has the device and (cast as its conv would cast it) dtype of the first
        impl = _backends.select(self.backend,
                                _backends.TensorLike(feats[0].device, autocast_result_dtype(feats[0].dtype, cast)))
        if type(self).get_result_from_layer_blocks is not FeaturePyramidNetwork.get_result_from_layer_blocks:
            layer = self.get_result_from_layer_blocks   # a subclass's own (idx as torchvision passes it)
        else:
            def layer(t: Tensor, idx: int) -> Tensor:
                return layer_blocks[idx](t)
        last_inner = self._lateral(inner_blocks[-1], feats[-1], None, impl, cast)
        results = [layer(last_inner, -1)]
        for idx in range(len(feats) - 2, -1, -1):
            last_inner = self._lateral(inner_blocks[idx], feats[idx], last_inner, impl, cast)
            results.insert(0, layer(last_inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, feats, names)
        return OrderedDict([(k, v) for k, v in zip(names, results)])
