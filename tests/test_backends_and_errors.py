"""Backend selection, import without the native extension, and clear errors for bad input."""
import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
import torchvision

import fused_fpn
from fused_fpn import backends


def test_the_native_extension_is_loaded():
    """The suite's cpu (and, on a GPU, cuda) rows are drawn from available_backends(): without
    fused_fpn._C they would drop out of every matrix, so a missing build fails here, loudly (set
    FUSED_FPN_ALLOW_NO_EXTENSION=1 to run the suite on the torch / triton backends alone)."""
    if os.environ.get("FUSED_FPN_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("FUSED_FPN_ALLOW_NO_EXTENSION=1")
    assert fused_fpn.extension_loaded(), f"fused_fpn._C did not load: {fused_fpn.extension_error()}"
    assert "cpu" in fused_fpn.available_backends("cpu")


def test_available_backends_here():
    names = fused_fpn.available_backends()
    assert "torch" in names and names == sorted(names)
    assert ("cpu" in names) == fused_fpn.extension_loaded()
    assert "torch" in fused_fpn.available_backends("cpu")
    if not torch.cuda.is_available():
        assert "cuda" not in names


def test_available_backends_on_a_device_this_process_lacks_is_empty():
    """A GPU this machine does not have (no CUDA, or an index past the count) and a device type this torch
    lacks give no backends, not torch's "Found no NVIDIA driver" or "not compiled with" errors; what
    names no device is a ValueError naming the argument."""
    missing = torch.cuda.device_count()   # the first CUDA index this machine lacks
    for device in (f"cuda:{missing}", torch.device("cuda", missing)) + (() if torch.cuda.is_available() else ("cuda", 0)):
        assert fused_fpn.available_backends(device) == [], device
    if not hasattr(torch, "xpu") or not torch.xpu.is_available():
        assert fused_fpn.available_backends("xpu") == []
    if not hasattr(torch, "hpu"):   # torch.empty raises ModuleNotFoundError there
        assert fused_fpn.available_backends("hpu") == []
    assert fused_fpn.available_backends(torch.device("cpu")) == fused_fpn.available_backends("cpu")
    for bad in ("nonsense", 1.5, [0]):
        with pytest.raises(ValueError, match=r"device must be a torch.device, a device string"):
            fused_fpn.available_backends(bad)


def test_auto_picks_the_cpu_kernel_on_cpu_tensors():
    x = torch.randn(1, 3, 4, 4)
    expected = "cpu" if fused_fpn.extension_loaded() else "torch"
    assert backends.select("auto", x).NAME == expected


def test_auto_takes_triton_on_cuda_only_when_compiled(monkeypatch):
    """On CUDA tensors "auto" tries Triton first while torch.compile traces, CUDA first otherwise,
    including inside a CUDA-graph capture by hand (its eager warm-up ran CUDA: a switch to Triton in
    the capture would meet untuned, unloaded kernels)."""
    assert backends.auto_order("cuda") == backends.AUTO_ORDER["cuda"] == ("cuda", "triton", "torch")
    assert backends.auto_order("cpu") == ("cpu", "torch") and backends.auto_order("mps") == ("torch",)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert backends.auto_order("cuda")[0] == "cuda", "a capture by hand keeps the eager order"
    monkeypatch.undo()   # torch.compile below must see this machine as it is
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x + len(backends.auto_order("cuda")[0]), fullgraph=True)
    assert torch.equal(compiled(torch.zeros(1)), torch.full((1,), float(len("triton"))))
    assert backends.auto_order("cuda") == ("cuda", "triton", "torch"), "eager again after tracing"


def test_backend_that_cannot_run_lists_the_ones_that_can():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"cuda.*Backends that can: \[.*'torch'"):
        fused_fpn.lateral(x, torch.randn(2, 3), backend="cuda")
    with pytest.raises(ValueError, match="unknown fused_fpn backend 'fast'"):
        fused_fpn.lateral(x, torch.randn(2, 3), backend="fast")


@pytest.mark.parametrize("backend,exc,pattern", [
    (["cpu"], TypeError, r"backend must be a string, 'auto' or one of \[.*\], got list \['cpu'\]"),
    (None, TypeError, r"backend must be a string, 'auto' or one of \[.*\], got NoneType None"),
    ("CPU", ValueError, r"backend must be 'auto' or one of \['torch', 'cpu', 'triton', 'cuda'\], got 'CPU'"),
])
def test_a_backend_that_is_no_backend_name_is_named_everywhere(backend, exc, pattern):
    """A list once raised "unhashable type" from the lateral op, and convert took any backend on a model
    without an FPN (the error came, if ever, at the first forward of an FPN added later)."""
    x = torch.randn(1, 3, 4, 4)
    lateral_pattern = pattern if exc is TypeError else r"unknown fused_fpn backend 'CPU'"
    with pytest.raises(exc, match=lateral_pattern):
        fused_fpn.lateral(x, torch.randn(2, 3), backend=backend)
    with pytest.raises(exc, match=pattern):
        fused_fpn.FPN([3], 2, backend=backend)
    with pytest.raises(exc, match=pattern):
        fused_fpn.convert(torch.nn.Sequential(torch.nn.ReLU()), backend=backend)
    with pytest.raises(exc, match=pattern):
        fused_fpn.FPN.from_torchvision(torchvision.ops.FeaturePyramidNetwork([3], 2), backend=backend)


def test_import_without_native_extension_leaves_only_torch_backend():
    code = ("import sys; sys.modules['fused_fpn._C'] = None\n"
            "import torch, fused_fpn\n"
            "assert not fused_fpn.extension_loaded(), 'extension should be missing'\n"
            "assert fused_fpn.available_backends() == ['torch'], fused_fpn.available_backends()\n"
            "x = torch.randn(1, 3, 4, 4); w = torch.randn(2, 3)\n"
            "y = fused_fpn.lateral(x, w, None, torch.randn(1, 2, 2, 2))\n"
            "assert y.shape == (1, 2, 4, 4)\n"
            "try:\n"
            "    fused_fpn.lateral(x, w, backend='cpu')\n"
            "except ValueError as e:\n"
            "    assert 'not built' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('expected ValueError')\n"
            "assert fused_fpn.onnx_translation_table() == {}, 'no fused op is registered'\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # no interpreter backend either
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr


def skip_unless_it_runs_on_cpu(backend):
    """Skip a row whose backend cannot run on CPU tensors here ("auto" and "torch" always can)."""
    if backend not in ("auto", "torch") and backend not in fused_fpn.available_backends("cpu"):
        pytest.skip(f"backend {backend} does not run on CPU tensors here")


@pytest.mark.parametrize("args,exc,pattern", [
    (lambda: (torch.randn(3, 4, 4), torch.randn(2, 3), None, None), ValueError, r"x must be 4-D"),
    (lambda: (torch.randint(0, 3, (1, 3, 4, 4)), torch.randn(2, 3), None, None), TypeError, "x must have a floating"),
    (lambda: (torch.randn(1, 3, 4, 4, dtype=torch.complex64), torch.randn(2, 3), None, None), TypeError, "floating"),
    # float8 is a floating dtype with no conv2d: it once reached ATen ("slow_conv2d_cpu" not implemented)
    (lambda: (torch.randn(1, 3, 4, 4).to(torch.float8_e4m3fn), torch.randn(2, 3).to(torch.float8_e4m3fn), None, None),
     TypeError, r"x must have a floating-point dtype \(float16, bfloat16, float32, float64\), got torch.float8_e4m3fn"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 4), None, None), ValueError, r"weight must be \[Cout, Cin\]"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3), None, None), ValueError, "weight must be"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3), torch.randn(3), None), ValueError, r"bias must be 1-D \[Cout\]"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3), None, torch.randn(2, 2, 2, 2)), ValueError, "top must be"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3), None, torch.randn(1, 3, 2, 2)), ValueError, "top must be"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3), None, torch.randn(1, 2, 0, 2)), ValueError, "non-empty"),
    # no input channels, but output pixels (bias + top): top still needs pixels
    (lambda: (torch.randn(1, 0, 3, 4), torch.randn(2, 0), None, torch.randn(1, 2, 0, 0)), ValueError, "non-empty"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3).double(), None, None), TypeError, "weight must have the same dtype"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3), None, torch.randn(1, 2, 2, 2).half()), TypeError, "top must have the same dtype"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3), None, torch.randn(1, 2, 2, 2, device="meta")), ValueError, "same device"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3, device="meta"), None, None), ValueError, "weight must be on the same device"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3), torch.randn(2, device="meta"), None), ValueError, "bias must be on the same device"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3), torch.randn(2).half(), None), TypeError, "bias must have the same dtype"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3), torch.randint(0, 3, (2,)), None), TypeError, "bias must have a floating"),
    # tensors that are not dense: each names the argument (the ops would say "SparseCPU backend" or worse)
    (lambda: (torch.randn(1, 3, 4, 4).to_sparse(), torch.randn(2, 3), None, None), TypeError,
     r"x must be a dense \(torch.strided\) tensor, got layout torch.sparse_coo"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3).to_sparse(), None, None), TypeError, "weight must be a dense"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3), torch.randn(2).to_sparse(), None), TypeError,
     "bias must be a dense"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3), None, torch.randn(1, 2, 2, 2).to_sparse()), TypeError,
     "top must be a dense"),
    (lambda: (torch.randn(1, 3, 4, 4).to_mkldnn(), torch.randn(2, 3), None, None), TypeError,
     r"x must be a dense .*layout torch._mkldnn"),
    (lambda: (torch.nested.nested_tensor([torch.randn(3, 4, 4), torch.randn(3, 2, 4)]), torch.randn(2, 3), None, None),
     TypeError, "x must be a dense .* got a nested tensor"),
])
@pytest.mark.parametrize("backend", ["auto", "torch", "cpu", "triton"])
def test_lateral_bad_input_raises_clear_error(args, exc, pattern, backend):
    """Every backend that runs on CPU tensors here (the Triton one under the interpreter) checks the
    arguments before it runs: the same exception and message for each."""
    skip_unless_it_runs_on_cpu(backend)
    x, w, b, top = args()

    def comparable(t):   # a dense tensor with data (torch.equal takes no meta, sparse or nested ones)
        return t is not None and t.device.type != "meta" and t.layout == torch.strided and not t.is_nested
    snapshot = [t.clone() if comparable(t) else None for t in (x, w, b, top)]
    with pytest.raises(exc, match=pattern):
        fused_fpn.lateral(x, w, b, top, backend=backend)
    for before, after in zip(snapshot, (x, w, b, top)):   # inputs untouched after a failure
        if before is not None:
            assert torch.equal(before, after)


@pytest.mark.skipif(not fused_fpn.extension_loaded(), reason="fused_fpn._C not built")
def test_cpu_op_rejects_empty_top_when_the_output_has_pixels():
    """The C++ check itself (the op called directly, below the Python checks): Cin == 0 leaves output pixels."""
    with pytest.raises(RuntimeError, match="top must have non-empty spatial size"):
        torch.ops.fused_fpn.lateral(torch.randn(1, 0, 3, 4), torch.randn(2, 0), None, torch.randn(1, 2, 0, 0))
    out = torch.ops.fused_fpn.lateral(torch.randn(0, 3, 3, 4), torch.randn(2, 3), None, torch.randn(0, 2, 0, 0))
    assert out.shape == (0, 2, 3, 4)


def _feats(*shapes, dtype=torch.float32):
    return OrderedDict((f"c{i}", torch.randn(s, dtype=dtype)) for i, s in enumerate(shapes))


@pytest.mark.parametrize("make_x,exc,pattern", [
    (lambda: {}, TypeError, "non-empty dict"),
    (lambda: [torch.randn(1, 4, 8, 8)], TypeError, "dict"),
    (lambda: _feats((1, 4, 8, 8)), ValueError, "built for 2 feature maps, got 1"),
    (lambda: _feats((1, 4, 8, 8), (1, 5, 4, 4)), ValueError, r"x\['c1'\] \(level 1\) must have 8 channels"),
    (lambda: _feats((1, 4, 8, 8), (8, 4, 4)), ValueError, r"x\['c1'\] must be 4-D"),
    (lambda: _feats((1, 4, 8, 8), (2, 8, 4, 4)), ValueError, "one batch size"),
    (lambda: OrderedDict(a=torch.randn(1, 4, 8, 8), b=torch.randn(1, 8, 4, 4).double()), TypeError, "one dtype"),
    (lambda: OrderedDict(a=torch.randn(1, 4, 8, 8), b=torch.randint(0, 2, (1, 8, 4, 4))), TypeError, "floating"),
    (lambda: _feats((1, 4, 8, 8), (1, 8, 4, 4), dtype=torch.complex64), TypeError, r"x\['c0'\] must have a floating"),
    (lambda: _feats((1, 4, 8, 8), (1, 8, 0, 4)), ValueError, r"x\['c1'\] has no pixels"),
    (lambda: _feats((1, 4, 8, 8), (1, 8, 4, 4), dtype=torch.float64), TypeError, "weights have dtype torch.float32"),
    (lambda: OrderedDict(a=torch.randn(1, 4, 8, 8), b=torch.randn(1, 8, 4, 4, device="meta")), ValueError, "one device"),
    (lambda: OrderedDict(a=torch.randn(1, 4, 8, 8), b=torch.randn(1, 8, 4, 4).to_sparse()), TypeError,
     r"x\['b'\] must be a dense"),
])
def test_fpn_bad_input_raises_clear_error(make_x, exc, pattern):
    fpn = fused_fpn.FPN([4, 8], 6)
    with pytest.raises(exc, match=pattern):
        fpn(make_x())


def _set_lateral_bias(fpn, bias):
    fpn.inner_blocks[0][0].bias = torch.nn.Parameter(bias)


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu", "triton"])
@pytest.mark.parametrize("mutate,exc,pattern", [
    # conv2d takes a meta bias beside CPU tensors and returns garbage (torchvision's FPN does): never here
    (lambda fpn: _set_lateral_bias(fpn, torch.zeros(6, device="meta")), ValueError,
     "the FPN's biases are on meta, the feature maps on cpu"),
    (lambda fpn: fpn.inner_blocks[1][0].to("meta"), ValueError, "the FPN's weights are on meta"),
    (lambda fpn: _set_lateral_bias(fpn, torch.zeros(6, dtype=torch.float64)), TypeError,
     "the FPN's lateral bias has dtype torch.float64, its weight torch.float32"),
])
def test_fpn_parameters_off_the_inputs_device_or_dtype_raise_clear_error(mutate, exc, pattern, backend):
    """A lateral weight or bias on another device or in another dtype than the feature maps: one
    message naming the module's parameters, on every backend (the op's checks would name "bias")."""
    skip_unless_it_runs_on_cpu(backend)
    fpn = fused_fpn.FPN([4, 8], 6, backend=backend)
    mutate(fpn)
    x = _feats((1, 4, 8, 8), (1, 8, 4, 4))
    snapshot = [t.clone() for t in x.values()]
    with pytest.raises(exc, match=pattern):
        fpn(x)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, x.values()))


@pytest.mark.parametrize("in_channels_list,out_channels,exc,pattern", [
    ([4, "8"], 6, TypeError, r"in_channels_list\[1\] must be an int, got str '8'"),
    ([4, 8.0], 6, TypeError, r"in_channels_list\[1\] must be an int, got float 8.0"),
    ([True, 8], 6, TypeError, r"in_channels_list\[0\] must be an int, got bool"),
    ([4, -1], 6, ValueError, r"in_channels_list\[1\] must be >= 1, got -1"),
    ([4, 0], 6, ValueError, "in_channels=0 is currently not supported"),   # torchvision's own message
    (4, 6, TypeError, "in_channels_list must be a list of ints .* got int"),
    ("48", 6, TypeError, "in_channels_list must be a list of ints .* got str"),
    ([4, 8], True, TypeError, "out_channels must be an int, got bool"),
])
def test_fpn_constructor_names_the_bad_argument(in_channels_list, out_channels, exc, pattern):
    """torchvision's constructor fails on these inside ATen or str.format, naming no argument."""
    with pytest.raises(exc, match=pattern):
        fused_fpn.FPN(in_channels_list, out_channels)


def test_fpn_constructor_takes_any_iterable_of_ints():
    fpn = fused_fpn.FPN((c for c in (4, 8)), 6)
    assert [b[0].in_channels for b in fpn.inner_blocks] == [4, 8]


@pytest.mark.parametrize("which", ["x", "weight", "bias"])
def test_lateral_under_autocast_names_the_float64_argument(which):
    """autocast never casts float64: x, weight or bias left in float64 beside the others cast to
    bfloat16 is eager conv2d's failure too; the message names that argument and autocast."""
    args = {"x": torch.randn(1, 3, 4, 4), "weight": torch.randn(2, 3), "bias": torch.randn(2)}
    args[which] = args[which].double()
    other = "weight" if which == "x" else "x"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=rf"{which} is float64, which autocast leaves as it is, while it casts "
                                            rf"{other} to torch.bfloat16"):
            fused_fpn.lateral(args["x"], args["weight"], args["bias"])


@pytest.mark.skipif(not fused_fpn.extension_loaded(), reason="fused_fpn._C not built")
@pytest.mark.parametrize("use_gemm", [False, True], ids=["convolution_backward", "gemm"])
def test_conv1x1_backward_op_checks_its_shapes(use_gemm):
    """The registered op below the autograd Function (callable on its own): a grad of another shape
    than [N, Cout, H, W] once gave dx / dW without an error (the GEMM path reshapes it)."""
    op = torch.ops.fused_fpn.conv1x1_backward
    x, w = torch.randn(1, 3, 4, 1), torch.randn(4, 3)
    dx, dw = op(torch.ones(1, 4, 4, 1), x, w, True, True, use_gemm)
    assert dx.shape == x.shape and dw.shape == w.shape
    with pytest.raises(RuntimeError, match=r"grad must be \[N, Cout, H, W\] = \[1, 4, 4, 1\], got \[1, 2, 8, 1\]"):
        op(torch.ones(1, 2, 8, 1), x, w, True, True, use_gemm)
    with pytest.raises(RuntimeError, match=r"grad must be \[N, Cout, H, W\] = \[1, 4, 4, 1\], got \[2, 4, 4, 1\]"):
        op(torch.ones(2, 4, 4, 1), x, w, True, True, use_gemm)
    with pytest.raises(RuntimeError, match=r"x must be 4-D \[N, Cin, H, W\] and weight 2-D \[Cout, Cin\]"):
        op(torch.ones(1, 4, 4, 1), x, torch.randn(4, 2), True, True, use_gemm)


@pytest.mark.skipif(not fused_fpn.extension_loaded(), reason="fused_fpn._C not built")
@pytest.mark.parametrize("use_gemm", [False, True], ids=["convolution_backward", "gemm"])
def test_conv1x1_backward_op_checks_dtypes_and_devices(use_gemm):
    """The op once took a meta grad with CPU x and weight (and returned tensors of no meaning), mixed
    dtypes with an error naming no argument, and int64 on the GEMM path."""
    op = torch.ops.fused_fpn.conv1x1_backward
    grad, x, w = torch.ones(1, 4, 4, 1), torch.randn(1, 3, 4, 1), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"grad and weight must have x's dtype Float, got grad Float and weight Double"):
        op(grad, x, w.double(), True, True, use_gemm)
    with pytest.raises(RuntimeError, match=r"grad and weight must have x's dtype Float, got grad Half"):
        op(grad.half(), x, w, True, True, use_gemm)
    with pytest.raises(RuntimeError, match=r"grad and weight must be on x's device cpu, got grad on meta"):
        op(grad.to("meta"), x, w, True, True, use_gemm)
    with pytest.raises(RuntimeError, match=r"x must have a floating-point dtype .* got Long"):
        op(grad.long(), x.long(), w.long(), True, True, use_gemm)


@pytest.mark.skipif(not fused_fpn.extension_loaded(), reason="fused_fpn._C not built")
def test_grad_bias_top_op_names_the_dtype_it_takes():
    with pytest.raises(RuntimeError, match="grad_out dtype must be float32, float64, bfloat16 or float16, got Long"):
        torch.ops.fused_fpn.lateral_grad_bias_top(torch.ones(1, 2, 3, 3, dtype=torch.long), 2, 2)


@pytest.mark.skipif(not fused_fpn.extension_loaded(), reason="fused_fpn._C not built")
def test_fake_impls_check_like_the_kernels():
    """The ops' fake (meta) impls run the kernels' checks: a direct call on meta tensors, or a trace,
    fails as the real op does instead of returning an output of a made-up shape."""
    def meta(*shape):
        return torch.empty(*shape, device="meta")
    with pytest.raises(ValueError, match=r"weight must be \[Cout, Cin\] or \[Cout, Cin, 1, 1\] with Cin"):
        torch.ops.fused_fpn.lateral(meta(1, 3, 4, 4), meta(2, 5), None, None)
    with pytest.raises(ValueError, match="top must be 4-D"):
        torch.ops.fused_fpn.lateral(meta(1, 3, 4, 4), meta(2, 3), None, meta(1, 3, 2, 2))
    assert torch.ops.fused_fpn.lateral(meta(1, 3, 4, 4), meta(2, 3), None, meta(1, 2, 2, 2)).shape == (1, 2, 4, 4)
    for device in ("meta", "cpu"):   # the op takes a 2-D weight only (fused_fpn.lateral reshapes a 4-D one)
        with pytest.raises((ValueError, RuntimeError), match=r"weight must be 2-D \[Cout, Cin\]"):
            torch.ops.fused_fpn.lateral(*(torch.empty(s, device=device) for s in ((1, 3, 4, 4), (2, 3, 1, 1))),
                                        None, None)
    with pytest.raises(ValueError, match="grad_out must be 4-D"):
        torch.ops.fused_fpn.lateral_grad_bias_top(meta(3, 4, 4), 2, 2)
    with pytest.raises(ValueError, match="top_h and top_w must both be positive"):
        torch.ops.fused_fpn.lateral_grad_bias_top(meta(1, 3, 4, 4), 2, 0)
