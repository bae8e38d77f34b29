"""fused_fpn.FPN as a drop-in for torchvision.ops.FeaturePyramidNetwork: construction, state_dict,
forward parity (fp32 / bf16, layouts, odd sizes, extra blocks, norm layers, batch 0), backward
parity, torch.compile."""
import copy
from collections import OrderedDict
from functools import partial

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops import feature_pyramid_network as tv_fpn

import fused_fpn
from fpn_testing import DEVICES, TOLERANCES, backend_device_params, backend_supports, make_input, rel_err

IN_CHANNELS = [8, 16, 24, 32]
OUT = 16


def feature_sizes(h, w, strides=(4, 8, 16, 32)):
    """ResNet-style feature sizes of an h x w image: ceil(h / s) x ceil(w / s)."""
    return [(-(-h // s), -(-w // s)) for s in strides]


def make_features(n, h, w, dtype, device, layout, channels=IN_CHANNELS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((f"c{i + 2}", make_input((n, c, *hw), dtype, device, layout, generator=g))
                       for i, (c, hw) in enumerate(zip(channels, feature_sizes(h, w))))


def randomize_(module, seed=0):
    """Random non-zero biases, norm scales and norm statistics (FrozenBatchNorm2d's scale and shift are
    buffers), so that parity tests exercise every term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "weight" in name else 0.0))
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.3)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
            elif name.endswith(("weight", "bias")):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return module


def pair(extra_tv=None, extra_ours=None, norm_layer=None, backend="auto", channels=IN_CHANNELS, out=OUT):
    tv = FeaturePyramidNetwork(channels, out, extra_blocks=extra_tv, norm_layer=norm_layer)
    randomize_(tv)
    ours = fused_fpn.FPN(channels, out, extra_blocks=extra_ours, norm_layer=norm_layer, backend=backend)
    ours.load_state_dict(tv.state_dict())
    return tv, ours


def assert_outputs_match(got, expected, dtype, ref64=None):
    assert list(got.keys()) == list(expected.keys())
    for k in expected:
        assert got[k].shape == expected[k].shape and got[k].dtype == expected[k].dtype, k
        assert not torch.isnan(got[k]).any(), k
        atol, rtol = TOLERANCES[dtype]
        if ref64 is None:
            torch.testing.assert_close(got[k].double(), expected[k].double(), atol=atol, rtol=rtol, msg=k)
        else:   # low precision: within 2x the eager error from the float64 truth, plus tolerance
            torch.testing.assert_close(got[k].double(), ref64[k], atol=atol * 4, rtol=rtol * 4, msg=k)
            assert rel_err(got[k], ref64[k]) <= 2 * rel_err(expected[k], ref64[k]) + 1e-3, k


def fusable_levels(fpn):
    """How many of ``fpn``'s lateral levels run as the fused op (the others run unfused)."""
    return sum(fused_fpn.lateral_params(block) is not None for block in fpn.inner_blocks)


@pytest.fixture
def fused_calls(monkeypatch):
    """fused_calls(backend, like=None) -> a list that grows by one per call of that backend's fused op
    (``lateral`` of the module FPN.forward selects, wrapped: the real op still runs). "auto" is
    resolved for feature maps like ``like``, as FPN.forward does. Eager only."""
    def watch(backend, like=None):
        module = (fused_fpn.backends.select(backend, like) if backend == "auto"
                  else fused_fpn.backends.get_backend(backend))
        calls, real = [], module.lateral

        def counted(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)
        monkeypatch.setattr(module, "lateral", counted)
        return calls
    return watch


pytestmark = pytest.mark.usefixtures("no_tf32")   # IEEE fp32 on GPUs (conftest)


def test_constructor_keys_init_and_repr_match_torchvision():
    torch.manual_seed(0)
    tv = FeaturePyramidNetwork(IN_CHANNELS, OUT, extra_blocks=tv_fpn.LastLevelP6P7(OUT, OUT))
    torch.manual_seed(0)
    ours = fused_fpn.FPN(IN_CHANNELS, OUT, extra_blocks=fused_fpn.LastLevelP6P7(OUT, OUT))
    assert list(ours.state_dict().keys()) == list(tv.state_dict().keys())
    for (k, a), (_, b) in zip(ours.state_dict().items(), tv.state_dict().items()):
        assert torch.equal(a, b), k            # same RNG draws: kaiming_uniform_(a=1), bias 0
    assert ours.state_dict()._metadata[""]["version"] == 2
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in tv.named_parameters()]
    assert "backend='auto'" in repr(ours)
    assert isinstance(ours, FeaturePyramidNetwork)
    with pytest.raises(ValueError, match="in_channels=0"):
        fused_fpn.FPN([8, 0], OUT)
    for bad in (0, -3):   # torchvision's takes 0, then fails in its first forward, in ATen's conv2d
        with pytest.raises(ValueError, match=rf"out_channels must be >= 1 \(the channels of every output level\), got {bad}"):
            fused_fpn.FPN([8], bad)
    with pytest.raises(TypeError, match="out_channels must be an int, got float"):
        fused_fpn.FPN([8], 16.0)
    with pytest.raises(TypeError, match="extra_blocks"):
        fused_fpn.FPN([8], OUT, extra_blocks=nn.ReLU())
    with pytest.raises(ValueError, match="backend"):
        fused_fpn.FPN([8], OUT, backend="nope")


def test_loads_version1_state_dict():
    tv, ours = pair()
    sd = tv.state_dict()
    old = OrderedDict((k.replace(".0.weight", ".weight").replace(".0.bias", ".bias"), v) for k, v in sd.items())
    old._metadata = copy.deepcopy(sd._metadata)
    old._metadata[""]["version"] = 1
    fresh = fused_fpn.FPN(IN_CHANNELS, OUT)
    fresh.load_state_dict(old)
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v)


@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("image_hw", [(33, 47), (64, 64), (29, 18)])
def test_forward_parity_fp32(device, backend, layout, image_hw, fused_calls):
    tv, ours = pair(tv_fpn.LastLevelMaxPool(), fused_fpn.LastLevelMaxPool(), backend=backend)
    tv, ours = tv.to(device), ours.to(device)
    x = make_features(2, *image_hw, torch.float32, device, layout)
    calls = fused_calls(backend)
    assert_outputs_match(ours(x), tv(x), torch.float32)
    assert len(calls) == fusable_levels(ours) == len(IN_CHANNELS)


@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_forward_parity_low_precision(device, backend, dtype, layout, fused_calls):
    if backend_supports(backend, device, dtype) is not None:
        pytest.skip(f"{backend} does not take {dtype} on {device}")
    tv, ours = pair(tv_fpn.LastLevelMaxPool(), fused_fpn.LastLevelMaxPool(), backend=backend)
    x = make_features(2, 33, 47, torch.float32, device, layout)
    ref64 = copy.deepcopy(tv).double().to(device)({k: v.double() for k, v in x.items()})
    tv, ours = tv.to(device, dtype), ours.to(device, dtype)
    xl = OrderedDict((k, v.to(dtype)) for k, v in x.items())
    calls = fused_calls(backend)
    assert_outputs_match(ours(xl), tv(xl), dtype, ref64)
    assert len(calls) == fusable_levels(ours) == len(IN_CHANNELS)


@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("in_ch", [OUT, 32], ids=["P6P7-from-P5", "P6P7-from-C5"])
def test_extra_block_p6p7_both_cases(device, backend, in_ch, fused_calls):
    tv_extra, our_extra = tv_fpn.LastLevelP6P7(in_ch, OUT), fused_fpn.LastLevelP6P7(in_ch, OUT)
    assert tv_extra.use_P5 == our_extra.use_P5 == (in_ch == OUT)
    tv, ours = pair(tv_extra, our_extra, backend=backend)
    tv, ours = tv.to(device), ours.to(device)
    x = make_features(1, 41, 37, torch.float32, device, "channels_last")
    calls = fused_calls(backend)
    got, expected = ours(x), tv(x)
    assert len(calls) == fusable_levels(ours) == len(IN_CHANNELS)
    assert list(got) == ["c2", "c3", "c4", "c5", "p6", "p7"]
    assert_outputs_match(got, expected, torch.float32)


def test_torchvision_extra_block_instances_are_accepted():
    tv, ours = pair(tv_fpn.LastLevelMaxPool(), tv_fpn.LastLevelMaxPool())
    x = make_features(1, 32, 32, torch.float32, "cpu", "nchw")
    assert list(ours(x)) == ["c2", "c3", "c4", "c5", "pool"]
    # and torchvision accepts ours
    FeaturePyramidNetwork(IN_CHANNELS, OUT, extra_blocks=fused_fpn.LastLevelMaxPool())

    class Custom(fused_fpn.ExtraFPNBlock):
        def forward(self, results, x, names):
            return results + [x[-1].sum(1, keepdim=True)], names + ["raw"]

    _, ours = pair(None, Custom())
    out = ours(x)
    assert list(out)[-1] == "raw" and torch.equal(out["raw"], x["c5"].sum(1, keepdim=True))


@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("norm", ["bn-eval", "bn-train", "frozen-bn", "gn"])
def test_norm_layers(device, backend, norm, fused_calls):
    norm_layer = {"bn-eval": nn.BatchNorm2d, "bn-train": nn.BatchNorm2d,
                  "frozen-bn": fused_fpn_frozen_bn(), "gn": partial(nn.GroupNorm, 4)}[norm]
    tv, ours = pair(norm_layer=norm_layer, backend=backend)
    tv, ours = tv.to(device), ours.to(device)
    if norm == "bn-train":
        tv.train(), ours.train()
    else:
        tv.eval(), ours.eval()
    fused = [fused_fpn.lateral_params(b) is not None for b in ours.inner_blocks]
    assert all(fused) == (norm in ("bn-eval", "frozen-bn")), fused   # folded BN runs the fused op
    x = make_features(2, 33, 47, torch.float32, device, "nchw")
    calls = fused_calls(backend)
    got, expected = ours(x), tv(x)
    assert len(calls) == fusable_levels(ours)
    assert_outputs_match(got, expected, torch.float32)
    if norm == "bn-train":       # running statistics were updated identically
        for (k, a), (_, b) in zip(ours.state_dict().items(), tv.state_dict().items()):
            torch.testing.assert_close(a, b, msg=k)


@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("norm", ["bn-eval", "frozen-bn"])
def test_folded_norm_after_a_conv_with_a_bias(device, backend, norm, fused_calls):
    """A user's lateral block Conv2d(bias=True) -> eval BatchNorm2d / FrozenBatchNorm2d (torchvision's
    norm_layer builds bias-free convs, so test_norm_layers never has one) is folded into the fused op
    with the conv's bias scaled by the norm: bias * scale + shift."""
    tv, ours = pair(backend=backend)
    for i, cin in enumerate(IN_CHANNELS):
        bn = nn.BatchNorm2d(OUT) if norm == "bn-eval" else fused_fpn_frozen_bn()(OUT)
        tv.inner_blocks[i] = randomize_(nn.Sequential(nn.Conv2d(cin, OUT, 1, bias=True), bn), seed=5 + i)
        ours.inner_blocks[i] = copy.deepcopy(tv.inner_blocks[i])
    tv, ours = tv.to(device).eval(), ours.to(device).eval()
    assert all(fused_fpn.lateral_params(b) is not None for b in ours.inner_blocks)
    x = make_features(2, 33, 47, torch.float32, device, "nchw")
    calls = fused_calls(backend)
    got, expected = ours(x), tv(x)
    assert len(calls) == len(IN_CHANNELS)
    assert_outputs_match(got, expected, torch.float32)


def fused_fpn_frozen_bn():
    from torchvision.ops.misc import FrozenBatchNorm2d
    return FrozenBatchNorm2d


@pytest.mark.parametrize("device,backend", backend_device_params())
def test_batch_size_zero(device, backend, fused_calls):
    tv, ours = pair(tv_fpn.LastLevelMaxPool(), fused_fpn.LastLevelMaxPool(), backend=backend)
    tv, ours = tv.to(device), ours.to(device)
    x = make_features(0, 33, 47, torch.float32, device, "nchw")
    calls = fused_calls(backend)
    got, expected = ours(x), tv(x)
    assert len(calls) == fusable_levels(ours) == len(IN_CHANNELS)
    assert [v.shape for v in got.values()] == [v.shape for v in expected.values()]


@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_backward_parity_whole_fpn(device, backend, layout, fused_calls):
    tv, ours = pair(tv_fpn.LastLevelP6P7(OUT, OUT), fused_fpn.LastLevelP6P7(OUT, OUT), backend=backend)
    tv, ours = tv.to(device), ours.to(device)
    x = make_features(2, 33, 47, torch.float32, device, layout)
    x_tv = OrderedDict((k, v.clone().requires_grad_()) for k, v in x.items())
    x_ours = OrderedDict((k, v.clone().requires_grad_()) for k, v in x.items())
    g = torch.Generator().manual_seed(5)
    calls = fused_calls(backend)
    out_tv, out_ours = tv(x_tv), ours(x_ours)
    assert len(calls) == fusable_levels(ours) == len(IN_CHANNELS)
    loss_w = {k: torch.randn(v.shape, generator=g).to(device) for k, v in out_tv.items()}
    sum((out_tv[k] * loss_w[k]).sum() for k in out_tv).backward()
    sum((out_ours[k] * loss_w[k]).sum() for k in out_ours).backward()
    for (name, p_tv), (_, p_ours) in zip(tv.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p_ours.grad, p_tv.grad, atol=2e-4, rtol=2e-4, msg=name)
    for k in x:
        torch.testing.assert_close(x_ours[k].grad, x_tv[k].grad, atol=2e-4, rtol=2e-4, msg=k)


@pytest.mark.parametrize("device,backend", backend_device_params())
def test_gradient_penalty_through_the_whole_fpn_matches_torchvision(device, backend, fused_calls):
    """Double backward through the FPN (create_graph=True, e.g. a gradient penalty on the inputs):
    the penalty's gradients of every parameter match torchvision's."""
    tv, ours = pair(tv_fpn.LastLevelMaxPool(), fused_fpn.LastLevelMaxPool(), backend=backend)
    tv, ours = tv.to(device), ours.to(device)
    x = make_features(2, 33, 47, torch.float32, device, "channels_last")
    calls = fused_calls(backend)
    grads = []
    for model in (tv, ours):
        inputs = OrderedDict((k, v.clone().requires_grad_()) for k, v in x.items())
        out = model(inputs)
        assert len(calls) == (fusable_levels(ours) if model is ours else 0)   # forward calls only
        loss = sum((out[k] * out[k]).mean() for k in out)
        first = torch.autograd.grad(loss, list(inputs.values()), create_graph=True)
        penalty = sum((d * d).sum() for d in first)
        grads.append(torch.autograd.grad(penalty, list(model.parameters())))
    for (name, _), got, want in zip(tv.named_parameters(), grads[1], grads[0]):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, atol=2e-4 * scale, rtol=2e-4, msg=name)


@pytest.mark.parametrize("device,backend", backend_device_params())
def test_forward_mode_jvp_through_the_whole_fpn_matches_torchvision(device, backend, fused_calls):
    tv, ours = pair(tv_fpn.LastLevelP6P7(OUT, OUT), fused_fpn.LastLevelP6P7(OUT, OUT), backend=backend)
    tv, ours = tv.to(device), ours.to(device)
    x = make_features(2, 29, 18, torch.float32, device, "nchw")
    tangent = make_features(2, 29, 18, torch.float32, device, "nchw", seed=1)
    calls = fused_calls(backend)
    _, t_tv = torch.func.jvp(lambda d: tv(d), (x,), (tangent,))
    _, t_ours = torch.func.jvp(lambda d: ours(d), (x,), (tangent,))
    assert len(calls) == fusable_levels(ours) == len(IN_CHANNELS)
    for k in t_tv:
        torch.testing.assert_close(t_ours[k], t_tv[k], atol=2e-4, rtol=2e-4, msg=k)


@pytest.mark.parametrize("device,backend", backend_device_params())
def test_features_in_another_dtype_than_the_module_raise_a_clear_error(device, backend):
    """fp16 features into an fp32 module (no autocast): an error naming both dtypes, as torchvision
    raises one."""
    tv, ours = pair(backend=backend)
    x = make_features(1, 16, 16, torch.float16, device, "nchw")
    with pytest.raises(RuntimeError, match="(?i)type"):
        tv.to(device)(x)
    with pytest.raises(TypeError, match=r"weights have dtype torch.float32, the feature maps torch.float16"):
        ours.to(device)(x)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_features_on_another_device_than_the_module_raise_a_clear_error(backend):
    """Weights on one device, feature maps on another: a ValueError naming both devices (the op's own
    check would name "weight", which the caller never passed). The module on the meta device stands in
    for a GPU here."""
    _, ours = pair(backend=backend)
    with pytest.raises(ValueError, match="weights are on meta, the feature maps on cpu"):
        ours.to("meta")(make_features(1, 16, 16, torch.float32, "cpu", "nchw"))


@pytest.mark.parametrize("device,backend", backend_device_params())
def test_a_coarse_level_without_pixels_under_a_finer_one_raises_a_clear_error(device, backend):
    """The top-down pathway upsamples each level into the next finer one: a coarse level with H or W = 0
    under a level with pixels has nothing to upsample (torchvision's F.interpolate raises too). A
    ValueError names both levels, for every backend (the "torch" reference raised an IndexError, the
    C++ kernel named "top"). Levels that are all empty still run (test_batch_size_zero)."""
    tv, ours = pair(backend=backend)
    tv, ours = tv.to(device), ours.to(device)
    x = make_features(1, 16, 16, torch.float32, device, "nchw")
    x["c5"] = x["c5"][:, :, :0]
    with pytest.raises(RuntimeError):
        tv(x)
    with pytest.raises(ValueError, match=r"x\['c5'\] has no pixels .* finer level x\['c4'\]"):
        ours(x)


@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("batch", [2, 0])
def test_a_level_with_an_empty_spatial_size_raises_a_clear_error(device, backend, batch):
    """A level with H or W = 0 (the finest, or every level; with images or batch 0): torchvision's FPN
    fails inside ATen (its 1x1 conv), and so did ours (the 3x3 output conv: "Calculated padded input
    size per channel"), naming no map; a ValueError names it."""
    tv, ours = pair(backend=backend)
    tv, ours = tv.to(device), ours.to(device)
    for empty in (["c2"], list(make_features(1, 16, 16, torch.float32, device, "nchw"))):
        x = make_features(batch, 16, 16, torch.float32, device, "nchw")
        for name in empty:
            x[name] = x[name][..., :0]
        with pytest.raises(RuntimeError):
            tv(x)
        with pytest.raises(ValueError, match=r"x\['c2'\] has an empty spatial size .* needs H, W >= 1"):
            ours(x)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_fpn_matches_eager(device):
    """torch.compile(fullgraph=True) with inductor matches eager, and the graph dynamo hands inductor
    holds one fused op per level ("auto": fused_fpn.lateral, the C++ op, on CPU; Triton's
    fused_fpn.triton_lateral on a GPU) and no upsample: the compiled FPN is the fused one."""
    from torch._inductor.compile_fx import compile_fx
    torch._dynamo.reset()
    _, ours = pair(tv_fpn.LastLevelMaxPool(), fused_fpn.LastLevelMaxPool())
    ours = ours.to(device)
    x = make_features(2, 33, 47, torch.float32, device, "channels_last")
    graphs = []

    def inductor_recording_graphs(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)
    compiled = torch.compile(ours, fullgraph=True, backend=inductor_recording_graphs)
    got, expected = compiled(x), ours(x)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-4, rtol=1e-4, msg=k)
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    fused = [t for t in targets if str(t).removesuffix(".default") in ("fused_fpn.lateral", "fused_fpn.triton_lateral")]
    targets = [str(getattr(t, "__name__", t)) for t in targets]
    assert len(fused) == len(IN_CHANNELS), targets
    assert not any("interpolate" in t or "upsample" in t for t in targets), targets


# ---- lateral blocks whose call does more than conv (+ norm): the unfused path, as torchvision ----

class _WeightStandardizedConv(nn.Conv2d):   # timm StdConv-style: its own forward
    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class _ShiftedBatchNorm(nn.BatchNorm2d):    # a norm subclass with its own forward
    def forward(self, x):
        return super().forward(x) + 1.0


def _alter_lateral_block(tv, how):
    """Changes inner_blocks[1] of ``tv`` so that its call does more than F.conv2d(x, weight, bias)."""
    block = tv.inner_blocks[1]
    conv = block[0]
    if how == "forward-hook":
        conv.register_forward_hook(lambda m, i, o: o * 0.5)
    elif how == "forward-pre-hook":
        conv.register_forward_pre_hook(lambda m, i: (i[0] * 2.0,))
    elif how == "block-hook":
        block.register_forward_hook(lambda m, i, o: o - 1.0)
    elif how == "legacy-weight-norm":
        torch.nn.utils.weight_norm(conv)
        with torch.no_grad():
            conv.weight_g.mul_(3.0)   # the weight the pre-hook computes differs from the stale .weight
    elif how == "prune":
        prune.l1_unstructured(conv, "weight", amount=0.5)
    elif how == "conv-subclass":
        std = _WeightStandardizedConv(conv.in_channels, conv.out_channels, 1)
        std.load_state_dict(conv.state_dict())
        block[0] = std
    elif how == "norm-subclass":
        norm = _ShiftedBatchNorm(conv.out_channels).eval()
        block.append(norm)
        conv.bias = None
    else:
        raise AssertionError(how)


ALTERATIONS = ["forward-hook", "forward-pre-hook", "block-hook", "legacy-weight-norm", "prune", "conv-subclass",
               "norm-subclass"]


@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("how", ALTERATIONS)
def test_lateral_blocks_that_do_more_than_conv_run_as_torchvision(device, backend, how, fused_calls):
    """Hooks (pruning, legacy weight_norm and quantization observers register them too) and conv /
    norm subclasses with their own forward: the fused op would skip them and silently give another
    answer; such a block runs unfused (block(x) + nearest(top)), and its neighbours stay fused."""
    tv = randomize_(FeaturePyramidNetwork(IN_CHANNELS, OUT)).eval()
    _alter_lateral_block(tv, how)
    tv = tv.to(device)
    ours = fused_fpn.FPN.from_torchvision(tv, backend=backend)   # the same blocks (some cannot be deep-copied)
    assert [fused_fpn.lateral_params(b) is not None for b in ours.inner_blocks] == [True, False, True, True]
    x = make_features(2, 33, 47, torch.float32, device, "nchw")
    calls = fused_calls(backend)
    assert_outputs_match(ours(x), tv(x), torch.float32)
    assert len(calls) == fusable_levels(ours) == len(IN_CHANNELS) - 1


@pytest.mark.parametrize("device,backend", backend_device_params())
def test_a_global_module_hook_sees_every_lateral_block_as_in_torchvision(device, backend, fused_calls):
    tv = randomize_(FeaturePyramidNetwork(IN_CHANNELS, OUT)).eval().to(device)
    ours = fused_fpn.convert(copy.deepcopy(tv), backend=backend)
    x = make_features(2, 33, 47, torch.float32, device, "nchw")
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__) or (o * 0.5 if isinstance(m, nn.Conv2d) else None))
    calls = fused_calls(backend)
    try:
        expected, n_tv = tv(x), len(seen)
        fused_under_hook = fusable_levels(ours)
        got = ours(x)
    finally:
        handle.remove()
    assert len(calls) == fused_under_hook == 0   # a global hook sees every block: all run unfused
    assert seen[n_tv:-1] == seen[:n_tv - 1] and seen[-1] == "FPN" and seen.count("Conv2d") == 4 * len(IN_CHANNELS)
    assert_outputs_match(got, expected, torch.float32)
    assert all(fused_fpn.lateral_params(b) is not None for b in ours.inner_blocks)   # the hook is gone


def test_pruned_fpn_trains_as_torchvision(fused_calls):
    """Pruning recomputes weight = weight_orig * mask in a forward pre-hook: a fused op reading the
    stale weight reused its freed graph ('backward through the graph a second time') at step 2."""
    def pruned():
        torch.manual_seed(0)
        fpn = randomize_(FeaturePyramidNetwork(IN_CHANNELS, OUT))
        prune.l1_unstructured(fpn.inner_blocks[0][0], "weight", amount=0.5)
        return fpn
    tv, ours = pruned(), fused_fpn.convert(pruned(), backend="auto")   # a pruned FPN cannot be deep-copied
    x = make_features(2, 17, 23, torch.float32, "cpu", "nchw")
    calls = fused_calls("auto", x["c2"])
    for model in (tv, ours):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            loss = sum(v.square().mean() for v in model(x).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert len(calls) == 3 * fusable_levels(ours) == 3 * (len(IN_CHANNELS) - 1)   # the pruned level unfused
    for (k, a), (_, b) in zip(ours.state_dict().items(), tv.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


# ---- autocast: the features as the convs see them ---------------------------------------------

def test_mixed_feature_dtypes_under_autocast_run_as_torchvision(fused_calls):
    """Under autocast the lateral convs cast float32 / float16 / bfloat16 maps to the autocast dtype,
    so torchvision accepts a mix; the extra blocks get the maps as passed, not cast copies."""
    tv, ours = pair(tv_fpn.LastLevelP6P7(IN_CHANNELS[-1], OUT), fused_fpn.LastLevelP6P7(IN_CHANNELS[-1], OUT))
    x = make_features(2, 33, 47, torch.float32, "cpu", "nchw")
    x["c3"], x["c4"] = x["c3"].bfloat16(), x["c4"].half()
    seen = []
    for model in (tv, ours):
        model.extra_blocks.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    calls = fused_calls("auto", x["c2"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = tv(x), ours(x)
    assert len(calls) == fusable_levels(ours) == len(IN_CHANNELS)
    assert_outputs_match(got, expected, torch.bfloat16)
    assert all(a is b for a, b in zip(seen[1], list(x.values()))), "the extra blocks got cast copies"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x["c3"] = x["c3"].double()
        with pytest.raises(TypeError,
                           match=r"one dtype \(under autocast to torch.bfloat16.*x\['c3'\] is torch.float64"):
            ours(x)


class _ScaledLateral(nn.Module):   # a user's lateral block with float32 arithmetic before its conv
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, t):
        return self.conv(t * 1000.0 + 0.01)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_unfused_levels_under_autocast_get_the_maps_uncast(fused_calls, backend):
    """Under autocast a lateral block that runs unfused (a hooked one, a custom one) gets its map as
    passed, as in torchvision: autocast casts for its conv alone, inside it. So its hooks see
    float32 and what it computes before its conv runs in float32 (both once got a bfloat16 copy; the
    custom level's map then differed from torchvision's by 7e-4 relative, inside bf16 tolerances,
    hence the bitwise comparison). The fused levels run in the autocast dtype."""
    tv, ours = pair(backend=backend)
    seen = {}
    for name, model in (("tv", tv), ("ours", ours)):
        model.inner_blocks[1] = _ScaledLateral(model.inner_blocks[1][0])
        model.inner_blocks[0].register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, args[0].dtype))
    x = make_features(2, 33, 47, torch.float32, "cpu", "nchw")
    calls = fused_calls(backend, x["c2"].bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = tv(x), ours(x)
    assert len(calls) == 2   # c4 and c5; c2 (hooked) and c3 (custom) unfused
    assert seen == {"tv": torch.float32, "ours": torch.float32}
    assert list(got) == list(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype == torch.bfloat16, k
        assert torch.equal(got[k], expected[k]), k


def test_lazy_conv_lateral_block_runs_as_torchvision(fused_calls):
    """A lateral ``nn.LazyConv2d`` (in_channels 0 until its first call infers it) is no channel
    count to check the map against: its first call runs unfused (its materializing pre-hook), as in
    torchvision, and later calls run fused with the inferred weight. (The check once raised "must
    have 0 channels".)"""
    tv, ours = pair()
    ours.inner_blocks[1][0] = nn.LazyConv2d(OUT, 1)
    x = make_features(1, 33, 47, torch.float32, "cpu", "nchw")
    calls = fused_calls("auto", x["c2"])
    ours(x)
    assert len(calls) == len(IN_CHANNELS) - 1 and ours.inner_blocks[1][0].in_channels == IN_CHANNELS[1]
    tv.load_state_dict(ours.state_dict())
    calls.clear()
    expected, got = tv(x), ours(x)
    assert len(calls) == len(IN_CHANNELS)
    assert_outputs_match(got, expected, torch.float32)
    with pytest.raises(ValueError, match=r"x\['c3'\] \(level 1\) must have 16 channels"):
        ours(make_features(1, 33, 47, torch.float32, "cpu", "nchw", channels=[8, 24, 24, 32]))


def test_float64_maps_under_autocast_name_the_maps():
    tv, ours = pair()
    x = make_features(1, 17, 23, torch.float64, "cpu", "nchw")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError):
        tv(x)   # torchvision fails too (autocast casts the weights, not float64 maps)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            TypeError, match="feature maps are float64, which autocast leaves as it is"):
        ours(x)


class _ReluFPN(FeaturePyramidNetwork):   # a user's subclass with its own forward
    def forward(self, x):
        return OrderedDict((k, torch.relu(v)) for k, v in super().forward(x).items())


class _FusedReluFPN(fused_fpn.FPN):      # the same, derived from the fused module
    def forward(self, x):
        return OrderedDict((k, torch.relu(v)) for k, v in super().forward(x).items())


def test_convert_leaves_subclasses_of_torchvision_fpn_alone_with_a_warning(fused_calls):
    """A fused_fpn.FPN in a subclass's place would drop its methods (here a forward with a ReLU):
    convert leaves it, with a warning naming it, and from_torchvision refuses it; deriving the
    subclass from fused_fpn.FPN fuses it with the same numbers."""
    model = nn.Module()
    model.sub = randomize_(_ReluFPN(IN_CHANNELS, OUT))
    model.plain = randomize_(FeaturePyramidNetwork(IN_CHANNELS, OUT))
    with pytest.warns(UserWarning, match=r"sub is _ReluFPN, a subclass of torchvision's FeaturePyramidNetwork; "
                                         r"left unfused"):
        assert fused_fpn.convert(model) is model
    assert type(model.sub) is _ReluFPN and type(model.plain) is fused_fpn.FPN
    with pytest.raises(TypeError, match="Derive _ReluFPN from fused_fpn.FPN instead"):
        fused_fpn.FPN.from_torchvision(model.sub)
    fused = _FusedReluFPN(IN_CHANNELS, OUT)
    fused.load_state_dict(model.sub.state_dict())
    assert fused_fpn.convert(fused) is fused   # already fused: returned as it is
    x = make_features(2, 33, 47, torch.float32, "cpu", "nchw")
    calls = fused_calls("auto", x["c2"])
    assert_outputs_match(fused(x), model.sub(x), torch.float32)
    assert len(calls) == fusable_levels(fused) == len(IN_CHANNELS)
    assert min(v.min().item() for v in fused(x).values()) == 0.0


def _hooked_model():
    model = nn.Module()
    model.fpn = randomize_(FeaturePyramidNetwork(IN_CHANNELS, OUT))
    return model


def test_hook_handles_taken_before_convert_still_remove_their_hooks():
    """from_torchvision once copied every dict of the module, hook dicts included: a handle taken on the
    torchvision FPN then removed its hook from the old dict only, and the fused FPN kept calling it."""
    model = _hooked_model()
    tv, calls = model.fpn, []
    handles = [tv.register_forward_pre_hook(lambda m, args: calls.append("pre")),
               tv.register_forward_hook(lambda m, args, out: calls.append("forward")),
               tv.register_state_dict_post_hook(lambda m, sd, prefix, meta: calls.append("state_dict"))]
    fused_fpn.convert(model)
    assert type(model.fpn) is fused_fpn.FPN
    x = make_features(1, 29, 31, torch.float32, "cpu", "nchw")
    model.fpn(x)
    model.state_dict()
    assert calls == ["pre", "forward", "state_dict"]
    for handle in handles:
        handle.remove()
    calls.clear()
    model.fpn(x)
    model.state_dict()
    assert calls == []
    model.fpn.extra = nn.ReLU()   # the module tree is the fused module's own
    assert "extra" not in tv._modules


def test_a_compiled_fpn_is_compiled_fused_with_its_options_after_convert():
    """fpn.compile(...) stores a compiled call of the torchvision module; copied as it was, it ran
    torchvision's forward (never fused) and never the fused module's own hooks."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = _hooked_model()
    eager = copy.deepcopy(model.fpn)
    model.fpn.compile(backend=recording_backend)
    fused_fpn.convert(model, backend="cpu")
    calls = []
    model.fpn.register_forward_hook(lambda m, args, out: calls.append("forward"))
    x = make_features(2, 29, 31, torch.float32, "cpu", "nchw")
    torch._dynamo.reset()
    try:
        got = model.fpn(x)
    finally:
        torch._dynamo.reset()
    assert calls == ["forward"]
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert sum("fused_fpn.lateral" in t for t in targets) == len(IN_CHANNELS), targets
    assert_outputs_match(got, eager(x), torch.float32)


def test_a_compiled_call_of_no_known_shape_is_compiled_with_defaults_and_a_warning(monkeypatch):
    """Where the compiled call holds no dynamo context (another torch), the fused FPN is compiled
    with torch.compile's defaults, and the warning says to pass the options again."""
    model = _hooked_model()
    model.fpn._compiled_call_impl = lambda *args, **kwargs: None   # stored, never called
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, *args, **kwargs: compiled.append((fn, args, kwargs)) or fn)
    with pytest.warns(UserWarning, match=r"compiled with torch.compile's defaults: call .compile\(...\) on it"):
        fused_fpn.convert(model)
    assert compiled == [(model.fpn._call_impl, (), {})]
    assert model.fpn._compiled_call_impl == model.fpn._call_impl


class _DoubledInner(FeaturePyramidNetwork):
    def get_result_from_inner_blocks(self, x, idx):
        return 2.0 * super().get_result_from_inner_blocks(x, idx)


class _ShiftedLayer(FeaturePyramidNetwork):
    def get_result_from_layer_blocks(self, x, idx):
        return super().get_result_from_layer_blocks(x, idx) + float(idx % 3)


class _FusedDoubledInner(fused_fpn.FPN, _DoubledInner):
    pass


class _FusedShiftedLayer(fused_fpn.FPN, _ShiftedLayer):
    pass


@pytest.mark.parametrize("tv_cls,fused_cls,fused_laterals", [
    (_DoubledInner, _FusedDoubledInner, 0),      # its own lateral computation: torchvision's forward
    (_ShiftedLayer, _FusedShiftedLayer, len(IN_CHANNELS)),   # laterals fused, its layer step called
], ids=["inner", "layer"])
def test_a_subclass_overriding_torchvision_hooks_gets_its_methods_called(tv_cls, fused_cls, fused_laterals,
                                                                         fused_calls):
    """A fused_fpn.FPN subclass overriding get_result_from_inner_blocks / get_result_from_layer_blocks
    (torchvision's extension points, called with idx -1 then L-2 .. 0) once had them ignored."""
    tv = randomize_(tv_cls(IN_CHANNELS, OUT))
    ours = fused_cls(IN_CHANNELS, OUT, backend="cpu")
    ours.load_state_dict(tv.state_dict())
    calls = fused_calls("cpu")
    x = make_features(2, 29, 31, torch.float32, "cpu", "nchw")
    assert_outputs_match(ours(x), tv(x), torch.float32)
    assert len(calls) == fused_laterals


def test_an_fpn_held_in_two_places_stays_one_module_after_convert():
    model = nn.Module()
    model.a = randomize_(FeaturePyramidNetwork(IN_CHANNELS, OUT))
    model.b = nn.Sequential(model.a)
    n_params = len(list(model.parameters()))
    fused_fpn.convert(model)
    assert type(model.a) is fused_fpn.FPN and model.b[0] is model.a
    assert len(list(model.parameters())) == n_params


def test_an_fpn_under_two_names_of_one_parent_stays_one_module_after_convert():
    """``m.a = m.b = fpn`` (and a ModuleList holding it twice): named_children yields a module once, under
    its first name, so the second name kept torchvision's FPN, unfused, and the two names parted."""
    model = nn.Module()
    model.a = model.b = randomize_(FeaturePyramidNetwork(IN_CHANNELS, OUT))
    twice = nn.ModuleList([FeaturePyramidNetwork(IN_CHANNELS, OUT)] * 2)
    fused_fpn.convert(model)
    fused_fpn.convert(twice)
    assert type(model.a) is fused_fpn.FPN and model.b is model.a
    assert type(twice[0]) is fused_fpn.FPN and twice[1] is twice[0]


@pytest.mark.parametrize("held", ["root", "child"])
def test_an_fpn_wrapped_by_torch_compile_runs_fused_after_convert(held, fused_calls):
    """``torch.compile(fpn)`` returns a wrapper whose forward was bound to the torchvision FPN when it was
    made: converting the FPN inside it (the wrapper itself, or a model holding the wrapper) once left the
    wrapper running torchvision's forward, unfused, while its ``_orig_mod`` read as converted."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    tv = randomize_(FeaturePyramidNetwork(IN_CHANNELS, OUT))
    eager = copy.deepcopy(tv)
    wrapper = torch.compile(tv, backend=recording_backend)
    if held == "root":
        model = fused_fpn.convert(wrapper, backend="cpu")
        assert model is wrapper
    else:
        model = nn.Module()
        model.fpn = wrapper
        fused_fpn.convert(model, backend="cpu")
        assert model.fpn is wrapper
    assert type(wrapper._orig_mod) is fused_fpn.FPN
    x = make_features(2, 29, 31, torch.float32, "cpu", "nchw")
    torch._dynamo.reset()
    try:
        got = wrapper(x)
        with torch._dynamo.config.patch(disable=True):   # eager through the wrapper: the fused op's calls
            calls = fused_calls("cpu")
            wrapper(x)
    finally:
        torch._dynamo.reset()
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert sum("fused_fpn.lateral" in t for t in targets) == len(IN_CHANNELS), targets
    assert len(calls) == len(IN_CHANNELS)
    assert_outputs_match(got, eager(x), torch.float32)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_convert_names_a_torchscript_fpn_it_leaves_unfused(how):
    """A scripted or traced FPN holds no Python module to replace: convert leaves it as it is, with a
    warning naming it (it once said nothing)."""
    tv = randomize_(FeaturePyramidNetwork(IN_CHANNELS, OUT)).eval()
    x = make_features(1, 29, 31, torch.float32, "cpu", "nchw")
    scripted = torch.jit.script(tv) if how == "script" else torch.jit.trace(tv, (x,), strict=False)
    model = nn.Module()
    model.body = nn.Module()
    model.body.fpn = scripted
    with pytest.warns(UserWarning, match=r"body\.fpn is a TorchScript FeaturePyramidNetwork"):
        fused_fpn.convert(model)
    assert model.body.fpn is scripted
    with pytest.warns(UserWarning, match=r"model is a TorchScript FeaturePyramidNetwork"):
        assert fused_fpn.convert(scripted) is scripted
