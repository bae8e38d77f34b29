"""Training, mixed precision, compilers and export with the fused FPN (issue: drop-in for real detectors)."""
import copy

import pytest
import torch
from torch import nn
from torchvision.ops import feature_pyramid_network as tv_fpn

import fused_fpn
from fpn_testing import DEVICES, SymbolicSizes, backend_device_params, eager_lateral, rel_err
from test_fpn_module import IN_CHANNELS, OUT, make_features, pair


def test_from_torchvision_and_convert_share_tensors():
    tv, _ = pair(tv_fpn.LastLevelMaxPool(), None)
    fused = fused_fpn.FPN.from_torchvision(tv, backend="torch")
    assert isinstance(fused, fused_fpn.FPN) and fused.backend == "torch"
    assert all(a is b for a, b in zip(fused.parameters(), tv.parameters()))
    x = make_features(1, 33, 47, torch.float32, "cpu", "nchw")
    for k, v in tv(x).items():
        torch.testing.assert_close(fused(x)[k], v, atol=1e-5, rtol=1e-5)
    assert fused_fpn.convert(tv) is not tv and isinstance(fused_fpn.convert(tv), fused_fpn.FPN)
    with pytest.raises(TypeError, match="FeaturePyramidNetwork"):
        fused_fpn.FPN.from_torchvision(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="nn.Module"):
        fused_fpn.convert("not a model")


@pytest.mark.parametrize("device_type,dtype", [("cpu", torch.bfloat16)]
                         + ([("cuda", torch.float16), ("cuda", torch.bfloat16)] if torch.cuda.is_available() else []))
def test_autocast_dtypes_and_values_match_eager(device_type, dtype):
    tv, ours = pair(tv_fpn.LastLevelMaxPool(), fused_fpn.LastLevelMaxPool())
    tv, ours = tv.to(device_type), ours.to(device_type)
    x = make_features(2, 33, 47, torch.float32, device_type, "channels_last")
    with torch.no_grad():
        ref64 = copy.deepcopy(tv).double()({k: v.double() for k, v in x.items()})
        with torch.autocast(device_type, dtype=dtype):
            expected, got = tv(x), ours(x)
    for k in expected:
        assert got[k].dtype == expected[k].dtype == dtype, k
        assert rel_err(got[k], ref64[k]) <= 2 * rel_err(expected[k], ref64[k]) + 1e-3, k


def _registered_op(backend):
    """The registered forward op of ``backend`` (the C++ op of cpu / cuda, the Triton one)."""
    if backend == "triton":
        return fused_fpn.backends.get_backend("triton").ops()[0]
    from fused_fpn import _ops
    assert _ops.register()
    return torch.ops.fused_fpn.lateral.default


def _autocast_op_params():
    params = []
    for device_type, dtypes in (("cpu", (torch.bfloat16, torch.float16)), ("cuda", (torch.float16, torch.bfloat16))):
        names = fused_fpn.available_backends(device_type) if device_type == "cpu" or torch.cuda.is_available() else []
        for backend in ("cpu", "cuda", "triton"):
            for dtype in dtypes:
                if backend in names and not (backend == "triton" and device_type == "cpu" and dtype == torch.bfloat16):
                    params.append(pytest.param(device_type, backend, dtype, id=f"{device_type}-{backend}-{dtype}"))
    return params


@pytest.mark.parametrize("device_type,backend,dtype", _autocast_op_params())
@pytest.mark.parametrize("top_dtype", [None, "cast", torch.float32], ids=["no_top", "top_cast", "top_fp32"])
def test_registered_op_under_autocast_casts_as_eager_conv2d(device_type, backend, dtype, top_dtype):
    """The registered ops have autocast kernels (fused_fpn/_autocast.py): called directly under
    torch.autocast (as a torch.export program calls them) they cast x, weight and bias as eager's
    conv2d does and keep top's dtype (a float32 top: added after the fused conv, promoted), so they
    give fused_fpn.lateral's results bit for bit, and eager's dtypes. Inside, their own conv2d route
    (a level without a top) is not cast again. Until 2026-12-07 the ops had no autocast rule and
    computed in their inputs' dtype."""
    op = _registered_op(backend)
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 16, 6, 7, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    top = None if top_dtype is None else torch.randn(2, 8, 3, 4, generator=g).to(
        dtype if top_dtype == "cast" else top_dtype)
    x, w, b, top = (None if t is None else t.to(device_type) for t in (x, w, b, top))
    with torch.autocast(device_type, dtype=dtype):
        out = op(x, w, b, top)
        expected = fused_fpn.lateral(x, w, b, top, backend=backend)
        eager = eager_lateral(x, w, b, top)
    assert out.dtype == expected.dtype == eager.dtype
    assert torch.equal(out, expected)
    with torch.autocast(device_type, dtype=dtype), pytest.raises(TypeError, match="x is float64, which autocast"):
        op(x.double(), w, b, top)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_python_layer_skips_the_autocast_kernels_it_has_cast_for(backend, monkeypatch):
    """fused_fpn.lateral and the FPN cast for autocast in Python (a plain eager Triton call never reaches
    the dispatcher), so the ops' autocast kernels (~10 us of Python each) would cast nothing more:
    their calls skip them, x requiring grad (the registered op) or not. A direct op call runs them."""
    from fused_fpn import _autocast
    if backend not in fused_fpn.available_backends("cpu"):
        pytest.skip(f"the {backend} backend does not run on CPU tensors here")
    calls, real = [], _autocast.cast_conv_args
    monkeypatch.setattr(_autocast, "cast_conv_args", lambda *a: calls.append(1) or real(*a))
    dtype = torch.float16 if backend == "triton" else torch.bfloat16   # (the interpreter: no bf16)
    _, ours = pair(backend=backend)
    x = make_features(1, 17, 23, torch.float32, "cpu", "nchw")
    g = torch.Generator().manual_seed(2)
    xl, w, b = torch.randn(1, 8, 5, 6, generator=g), torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    top = torch.randn(1, 4, 3, 3, generator=g)
    with torch.autocast("cpu", dtype=dtype):
        ours(x)
        fused_fpn.lateral(xl, w, b, top.to(dtype), backend=backend)
        fused_fpn.lateral(xl.requires_grad_(), w, b, top, backend=backend).sum().backward()
        assert calls == []
        _registered_op(backend)(xl, w, b, top.to(dtype))
    assert calls == [1]


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_export_under_autocast_records_no_casts(backend, no_tf32):
    """torch.export records ATen's conv2d uncast under an autocast around the call, and the autocast
    in force when the program runs casts it. The FPN and lateral do the same while exporting (no
    casts in the program; the ops' autocast kernels cast at run time), so the program runs without
    autocast and under either autocast dtype with the results of the module run the same way. They
    once recorded the casts of the autocast around the export: the program then failed outside it
    (the 3x3 convs' float32 weights beside bfloat16 maps) and ran its fused levels in bfloat16
    under float16 autocast."""
    if backend != "auto" and backend not in fused_fpn.available_backends("cpu"):
        pytest.skip(f"the {backend} backend does not run on CPU tensors here")
    _, ours = pair(tv_fpn.LastLevelMaxPool(), fused_fpn.LastLevelMaxPool(), backend=backend)
    ours = ours.eval()
    x = make_features(1, 33, 47, torch.float32, "cpu", "channels_last")
    traced_under = torch.float16 if backend == "triton" else torch.bfloat16   # (the interpreter: no bf16)
    with torch.autocast("cpu", dtype=traced_under):
        exported = torch.export.export(ours, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert sum("fused_fpn" in t for t in targets) == len(IN_CHANNELS), targets
    assert not any("to" in t.split(".")[1:2] or "_to_copy" in t for t in targets), targets
    program = exported.module()
    dtypes = [None, torch.float16] + ([torch.bfloat16] if backend != "triton" else [])
    for dtype in dtypes:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            got, expected = program(x), ours(x)
        assert list(got) == list(expected)
        for k in expected:
            assert got[k].dtype == expected[k].dtype == (dtype or torch.float32), (dtype, k)
            assert torch.equal(got[k], expected[k]), (dtype, k)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("top_dtype", [None, torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=["no_top", "top_bf16", "top_fp16", "top_fp32", "top_fp64"])
def test_lateral_under_autocast_keeps_tops_dtype_as_eager(backend, top_dtype):
    """Eager's interpolate and add are no autocast ops: a float32 top gives a float32 sum. lateral once
    cast top too (a bfloat16 output) and raised on a float64 top."""
    if backend not in fused_fpn.available_backends("cpu"):
        pytest.skip(f"the {backend} backend is not available here")
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(2, 16, 7, 9, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    top = None if top_dtype is None else torch.randn(2, 8, 4, 5, generator=g).to(top_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = eager_lateral(x, w, b, top)
        got = fused_fpn.lateral(x, w, b, top, backend=backend)
    assert got.dtype == expected.dtype
    tol = 1e-2 if expected.dtype in (torch.bfloat16, torch.float16) else 1e-6
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


class TinyDetectorHead(nn.Module):
    """FPN + a shared 1x1 head: enough to train the FPN end to end."""

    def __init__(self, fpn):
        super().__init__()
        self.fpn = fpn
        self.head = nn.Conv2d(OUT, 3, 1)

    def forward(self, feats):
        return sum(self.head(v).square().mean() for v in self.fpn(feats).values())


@pytest.mark.parametrize("device,backend", backend_device_params())
def test_sgd_steps_track_torchvision(device, backend, no_tf32):
    """Four SGD steps with momentum keep every parameter within fp32 rounding of torchvision's. IEEE
    fp32 on both sides (no_tf32): on CUDA torchvision's convs and their backward run on TF32 by default,
    which is rounding of another size (TF32 parity of the forward is tested with the lateral op)."""
    tv, ours = pair(tv_fpn.LastLevelMaxPool(), fused_fpn.LastLevelMaxPool(), backend=backend)
    torch.manual_seed(0)
    model_tv = TinyDetectorHead(tv).to(device)
    model_ours = TinyDetectorHead(ours).to(device)
    model_ours.head.load_state_dict(model_tv.head.state_dict())
    opt_tv = torch.optim.SGD(model_tv.parameters(), lr=0.05, momentum=0.9)
    opt_ours = torch.optim.SGD(model_ours.parameters(), lr=0.05, momentum=0.9)
    for step in range(4):
        x = make_features(2, 33, 47, torch.float32, device, "channels_last", seed=step)
        for model, opt in ((model_tv, opt_tv), (model_ours, opt_ours)):
            opt.zero_grad()
            model(x).backward()
            opt.step()
        for (n, a), (_, b) in zip(model_tv.named_parameters(), model_ours.named_parameters()):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=f"step {step}: {n}")


@pytest.mark.parametrize("device", DEVICES)
def test_dynamo_sees_no_graph_break(device):
    torch._dynamo.reset()
    _, ours = pair(tv_fpn.LastLevelP6P7(OUT, OUT), fused_fpn.LastLevelP6P7(OUT, OUT))
    ours = ours.to(device)
    x = make_features(2, 33, 47, torch.float32, device, "nchw")
    explanation = torch._dynamo.explain(ours)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("device", DEVICES)
def test_compile_dynamic_shapes_match_eager(device, no_tf32):
    """torch.compile(dynamic=True) of the FPN's forward ("auto": the cpu kernel on CPU, Triton on a
    GPU): one graph serves every batch and image size (the ops keep the sizes symbolic; a
    specialized size would recompile), and its outputs match eager's. Under no_grad: with autograd,
    torch 2.14's compile of the backward specializes sizes on CPU for torchvision's own FPN too
    (guards from _aot_stage2b_bw_compile), so a recompile there would not be the fused ops'. No
    extra block: torch 2.11's max_pool2d meta guards on the parity of C5's size (torchvision's
    LastLevelMaxPool then recompiles for an odd C5 after an even one, with either FPN)."""
    torch._dynamo.reset()
    _, ours = pair()
    ours = ours.to(device)
    compiled = torch.compile(ours, fullgraph=True, dynamic=True)
    # first sizes all different (dynamo gives equal sizes one symbol: "duck sizing")
    for i, hw in enumerate([(200, 296), (168, 328), (256, 256)]):
        x = make_features(2 + i, *hw, torch.float32, device, "nchw")
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = compiled(x)
            expected = ours(x)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], atol=1e-4, rtol=1e-4, msg=f"{hw} {k}")


def test_converted_detector_has_no_graph_break_from_fused_fpn():
    from torchvision.models import detection
    torch._dynamo.reset()
    model = detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=96, max_size=144)
    backbone = fused_fpn.convert(model.backbone).eval()       # BackboneWithFPN: body + fused FPN
    x = torch.rand(1, 3, 96, 128)
    explanation = torch._dynamo.explain(backbone)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(backbone, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got, expected = compiled(x), backbone(x)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_export_runs_and_matches(device, no_tf32):
    """The exported program holds the fused op and gives eager's numbers. On CUDA "auto" traces the
    triton backend and runs cuda eagerly: two kernels, compared in IEEE fp32 (no_tf32)."""
    _, ours = pair(tv_fpn.LastLevelMaxPool(), fused_fpn.LastLevelMaxPool())
    ours = ours.to(device).eval()
    x = make_features(2, 33, 47, torch.float32, device, "nchw")
    exported = torch.export.export(ours, (x,))
    assert any("fused_fpn" in str(n.target) for n in exported.graph.nodes) or "cpu" not in \
        fused_fpn.available_backends(device), "the exported graph should hold the fused op"
    got, expected = exported.module()(x), ours(x)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-5)


@pytest.mark.slow   # an AOTInductor build: about half a minute on 2 CPU cores
@pytest.mark.parametrize("device", DEVICES)
def test_aot_inductor_package_runs_the_fpn_with_dynamic_sizes(device, tmp_path, no_tf32):
    """torch.export with dynamic batch and spatial sizes, then AOTInductor
    (``torch._inductor.aoti_compile_and_package``): the package runs the fused FPN (on CPU the C++
    op, called from the compiled code; on a GPU what "auto" traced, the Triton kernels) and matches
    eager on sizes other than the traced ones. No extra block: torch's max-pool level adds guards
    of its own (C5 at least 3; with torch 2.11, the parity of C5's size)."""
    _, ours = pair()
    ours = ours.to(device).eval()
    x = make_features(2, 200, 296, torch.float32, device, "nchw")
    n = torch.export.Dim("n", min=1, max=8)
    dims = {k: {0: n, 2: torch.export.Dim(f"{k}_h", min=2, max=256), 3: torch.export.Dim(f"{k}_w", min=2, max=256)}
            for k in x}
    exported = torch.export.export(ours, (x,), dynamic_shapes={"x": dims})
    assert any("fused_fpn" in str(node.target) for node in exported.graph.nodes)
    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "fpn.pt2"))
    compiled = torch._inductor.aoti_load_package(package)
    for batch, hw in [(2, (200, 296)), (3, (168, 328)), (1, (96, 64))]:
        x = make_features(batch, *hw, torch.float32, device, "nchw", seed=batch)
        with torch.no_grad():
            got, expected = compiled(x), ours(x)
        assert list(got) == list(expected)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], atol=1e-4, rtol=1e-4, msg=f"{batch} {hw} {k}")


class _Lateral(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(6, 4, generator=g))
        self.bias = torch.nn.Parameter(torch.randn(6, generator=g))

    def forward(self, x, top):
        return fused_fpn.lateral(x, self.weight, self.bias, top, backend=self.backend)


@pytest.mark.parametrize("device,backend", [("cpu", "torch"), ("cpu", "cpu")] + (
    [("cuda", name) for name in ("auto", "triton", "cuda", "torch")] if torch.cuda.is_available() else []))
def test_torch_export_with_dynamic_spatial_sizes(device, backend, no_tf32):
    """N, H, W and the top's size symbolic: the "torch" backend's index rule once specialized them
    (float(SymInt)), and so did the Triton launchers (the nearest scales, the autotune key's bucket),
    which under export is an error; the exported program must give the reference's output on
    other sizes too."""
    if backend != "auto" and backend not in fused_fpn.available_backends(device):
        pytest.skip(f"backend {backend} does not run on {device} tensors here")
    model = _Lateral(backend).to(device)
    n = torch.export.Dim("n", min=1, max=64)
    h, w = torch.export.Dim("h", min=2, max=512), torch.export.Dim("w", min=2, max=512)
    th, tw = torch.export.Dim("th", min=2, max=512), torch.export.Dim("tw", min=2, max=512)
    g = torch.Generator().manual_seed(1)
    x, top = torch.randn(2, 4, 9, 11, generator=g).to(device), torch.randn(2, 6, 5, 6, generator=g).to(device)
    exported = torch.export.export(model, (x, top),
                                   dynamic_shapes={"x": {0: n, 2: h, 3: w}, "top": {0: n, 2: th, 3: tw}})
    for b, (hh, ww), (tth, ttw) in [(2, (9, 11), (5, 6)), (3, (33, 47), (17, 24)), (1, (164, 7), (2, 9)),
                                    (2, (5, 5), (9, 11))]:
        x, top = torch.randn(b, 4, hh, ww, generator=g), torch.randn(b, 6, tth, ttw, generator=g)
        expected = fused_fpn.lateral_reference(x.double(), model.weight.double().cpu(), model.bias.double().cpu(),
                                               top.double())
        got = exported.module()(x.to(device), top.to(device))
        torch.testing.assert_close(got.double().cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("device,backend", backend_device_params())
def test_compiled_lateral_gathers_the_same_rows_as_eager(device, backend, dynamic):
    """torch.compile of each backend's op, with static and with dynamic shapes, gathers bit for bit
    the rows eager does (zero weight: the output is the gathered top) for exact ratios (2 -> 6,
    25 -> 50, ...), where one ulp of the scale picks the row before:
    - "torch" with dynamic shapes computes the index rule's scale in the graph from symbolic sizes: a
      float32 division compiled for a GPU may be approximate;
    - "triton" traced with symbolic sizes computes the scales in the kernel (must be div.rn), and
      with static ones takes the host's scales as Python floats, which inductor passes to the kernel
      as fp64 (the kernel casts them to fp32, else the rule's product runs in fp64 and picks other
      rows, e.g. 2 -> 50 at row 25).
    The GPU cases run where the suite runs on a GPU."""
    torch._dynamo.reset()
    weight = torch.zeros(3, 2, device=device)
    compiled = torch.compile(lambda x, top: fused_fpn.lateral(x, weight, None, top, backend=backend), dynamic=dynamic)
    g = torch.Generator().manual_seed(0)
    for (h, w), (th, tw) in [((6, 50), (2, 25)), ((21, 39), (7, 13)), ((200, 9), (100, 3)), ((5, 164), (9, 2)),
                             ((48, 60), (16, 12)), ((7, 7), (7, 7))]:
        x = torch.randn(1, 2, h, w, generator=g).to(device)
        top = torch.randn(1, 3, th, tw, generator=g).to(device)
        expected = fused_fpn.lateral(x, weight, None, top, backend=backend)
        assert torch.equal(compiled(x, top), expected), ((h, w), (th, tw))


@pytest.mark.parametrize("device,backend", backend_device_params())
def test_forward_and_backward_keep_sizes_symbolic(device, backend):
    """fused_fpn.lateral and its backward on fake tensors whose N, H, W and top sizes are symbols (what
    torch.compile's dynamic shapes and torch.export with Dims trace), both layouts: no size is pinned
    to its value (a pinned size means a recompile per image size, or a failed export with Dims).
    On a GPU the "triton" case traces the registered triton_op's body, the launchers included (on
    CPU the interpreter's custom ops have separate fake impls; tests/test_triton_interpret.py checks
    the launchers there)."""
    sym = SymbolicSizes()
    for fmt in (torch.contiguous_format, torch.channels_last):
        def case(shape, other_shape):
            return (sym.tensor(torch.randn(shape, device=device).contiguous(memory_format=fmt), (0, 2, 3),
                               torch.randn(other_shape, device=device).contiguous(memory_format=fmt))
                    .requires_grad_())
        x, top = case((2, 8, 40, 44), (3, 8, 37, 29)), case((2, 4, 20, 22), (3, 4, 19, 15))
        weight = sym.tensor(torch.randn(4, 8, device=device)).requires_grad_()
        bias = sym.tensor(torch.randn(4, device=device)).requires_grad_()
        with sym.mode:
            y = fused_fpn.lateral(x, weight, bias, top, backend=backend)
            grads = torch.autograd.grad(y.sum(), [x, weight, bias, top])
        assert [tuple(g.shape) for g in grads] == [tuple(x.shape), (4, 8), (4,), tuple(top.shape)]
        assert all(isinstance(s, torch.SymInt) for s in (*x.shape[2:], *top.shape[2:]))
    sym.assert_none_pinned()


def test_jit_script_raises_a_clear_error():
    _, ours = pair()
    with pytest.raises(RuntimeError, match=r"fused_fpn\.FPN does not support torch\.jit\.script.*torch\.compile"):
        torch.jit.script(ours)


def _traced_nodes(gm):
    return [(n.op, n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)))
            for n in gm.graph.nodes]


@pytest.mark.parametrize("norm", [None, nn.BatchNorm2d], ids=["plain", "batchnorm"])
def test_fx_symbolic_trace_records_torchvisions_graph(norm):
    """torch.fx.symbolic_trace (FX graph mode quantization, graph surgery, feature extraction inside
    the FPN) of a fused FPN records torchvision's forward: the same nodes as tracing torchvision's FPN
    (its inner / layer block modules, interpolate, add), and the traced module gives torchvision's
    outputs bit for bit. (The proxies used to fail the fused path's checks: "must be a torch.Tensor,
    got Proxy".)"""
    tv, ours = pair(tv_fpn.LastLevelMaxPool(), fused_fpn.LastLevelMaxPool(), norm_layer=norm)
    tv, ours = tv.eval(), ours.eval()
    x = make_features(2, 33, 47, torch.float32, "cpu", "nchw")

    class Positional(nn.Module):
        def __init__(self, fpn):
            super().__init__()
            self.fpn = fpn

        def forward(self, c2, c3, c4, c5):
            return self.fpn({"c2": c2, "c3": c3, "c4": c4, "c5": c5})

    traced_tv, traced_ours = torch.fx.symbolic_trace(Positional(tv)), torch.fx.symbolic_trace(Positional(ours))
    assert _traced_nodes(traced_ours) == _traced_nodes(traced_tv)
    convs = [t for op, t in _traced_nodes(traced_ours) if op == "call_module" and t.startswith("fpn.inner_blocks")]
    assert [t for t in convs if t.endswith(".0")] == [f"fpn.inner_blocks.{i}.0" for i in (3, 2, 1, 0)]
    with torch.no_grad():
        got, expected = traced_ours(*x.values()), tv(x)
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_fx_symbolic_trace_of_lateral_is_one_node_of_it():
    """fused_fpn.lateral called on proxies is recorded as one call_function node of itself (backend
    argument kept), which runs the fused op when the traced module runs."""
    g = torch.Generator().manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 5, generator=g))
            self.bias = nn.Parameter(torch.randn(6, generator=g))

        def forward(self, x, top):
            return fused_fpn.lateral(x, self.weight, self.bias, top, backend="torch").relu()

    traced = torch.fx.symbolic_trace(M())
    calls = [n for n in traced.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [fused_fpn.lateral] and calls[0].kwargs == {"backend": "torch"}
    x, top = torch.randn(2, 5, 7, 9, generator=g), torch.randn(2, 6, 4, 5, generator=g)
    expected = fused_fpn.lateral(x, traced.weight, traced.bias, top).relu()
    torch.testing.assert_close(traced(x, top), expected, atol=1e-6, rtol=1e-6)
