"""Autograd (gradcheck in fp64, gradient parity), the registered ops (opcheck), torch.compile."""
import contextlib

import pytest
import torch

import fused_fpn
from fpn_testing import (DEVICES, RecordOps, backend_device_params, backend_supports, eager_lateral,
                         gradient_penalty_grads, make_lateral_case, to64)
from fused_fpn.reference import lateral_grad_bias_top_reference

pytestmark = pytest.mark.usefixtures("no_tf32")   # IEEE fp32 on GPUs (conftest)


needs_ext = pytest.mark.skipif(not fused_fpn.extension_loaded(), reason="fused_fpn._C not built")


def _fp64_lateral_case(device, backend, layout, cin, cout, with_bias, with_top, top_hw):
    """(fn, inputs) for gradcheck / gradgradcheck: fused_fpn.lateral on this backend and float64
    leaves x [2, cin, 5, 6], weight, bias, top (None where absent); skips a backend without fp64
    (its gradients are checked in fp32 by the tests below)."""
    if backend_supports(backend, device, torch.float64) is not None:
        pytest.skip(f"{backend} has no float64 on {device}; its gradients are checked in fp32 below")
    case = make_lateral_case(2, cin, cout, (5, 6), top_hw or (1, 1), torch.float64, device, layout,
                             with_bias=with_bias, with_top=with_top)
    inputs = [t.requires_grad_() if t is not None else None for t in case]

    def fn(x, w, b, top):
        return fused_fpn.lateral(x, w, b, top, backend=backend)

    return fn, inputs


@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("with_bias,with_top,top_hw", [(True, True, (3, 4)), (True, True, (7, 9)),
                                                       (False, True, (2, 2)), (True, False, None)])
def test_gradcheck_fp64(device, backend, layout, with_bias, with_top, top_hw):
    fn, inputs = _fp64_lateral_case(device, backend, layout, 5, 4, with_bias, with_top, top_hw)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck_fp32(device, backend, layout):
    """gradcheck in fp32 for every backend, those without fp64 (cuda, triton) included: the op is
    linear in each input, so central differences are exact but for fp32 rounding (~1e-7 of the
    output over 2 * eps = 2e-2: ~1e-5), far below the tolerance; a wrong gradient entry is off by O(1).
    TF32 off (no_tf32)."""
    case = make_lateral_case(1, 3, 4, (3, 5), (2, 3), torch.float32, device, layout)
    inputs = [t.requires_grad_() for t in case]

    def fn(x, w, b, top):
        return fused_fpn.lateral(x, w, b, top, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-2, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradients_fp32_match_reference(device, backend, layout):
    x, w, b, top = make_lateral_case(2, 24, 16, (9, 13), (5, 7), torch.float32, device, layout)
    ins = [t.requires_grad_() for t in (x, w, b, top)]
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    out = fused_fpn.lateral(*ins, backend=backend)
    ref = fused_fpn.lateral_reference(*ins64)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device)
    out.backward(g)
    ref.backward(g.double())
    for name, a, r in zip("x w b top".split(), ins, ins64):
        torch.testing.assert_close(a.grad.double(), r.grad, atol=1e-3, rtol=1e-3, msg=f"grad of {name}")


@pytest.mark.parametrize("device,backend", backend_device_params())
def test_requires_grad_on_some_inputs_only(device, backend):
    x, w, b, top = make_lateral_case(1, 6, 4, (4, 4), (2, 2), torch.float32, device, "nchw")
    top.requires_grad_()
    out = fused_fpn.lateral(x, w, b, top, backend=backend)
    out.sum().backward()
    expected = torch.full_like(top, 4.0)          # every top pixel has a 2x2 preimage
    torch.testing.assert_close(top.grad, expected)
    assert x.grad is None and w.grad is None


# ---- double backward (create_graph=True) ----------------------------------------------------------

DOUBLE_BACKWARD_CASES = [(True, True, (3, 4)), (True, True, (7, 9)), (False, False, None)]


@pytest.mark.filterwarnings("error::UserWarning")   # e.g. "an autograd kernel was not registered"
@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("with_bias,with_top,top_hw", DOUBLE_BACKWARD_CASES)
def test_gradgradcheck_fp64(device, backend, layout, with_bias, with_top, top_hw):
    """Second derivatives (gradients of gradients) of every input, by finite differences."""
    fn, inputs = _fp64_lateral_case(device, backend, layout, 4, 3, with_bias, with_top, top_hw)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_double_backward_fp32_matches_reference(device, backend, layout):
    x, w, b, top = make_lateral_case(2, 12, 8, (9, 13), (5, 7), torch.float32, device, layout)
    ins = [t.requires_grad_() for t in (x, w, b, top)]
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    weight_out = torch.rand((2, 8, 9, 13), generator=torch.Generator().manual_seed(5)).to(device)
    first, second = gradient_penalty_grads(lambda *a: fused_fpn.lateral(*a, backend=backend), ins, weight_out)
    first64, second64 = gradient_penalty_grads(fused_fpn.lateral_reference, ins64, weight_out.double())
    for name, a, r in zip("x w b top".split(), first + second, first64 + second64):
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(a.double(), r, atol=1e-4 * scale, rtol=1e-4, msg=f"{name}")


@needs_ext
@pytest.mark.parametrize("create_graph", [False, True])
def test_backward_ops_with_and_without_create_graph(create_graph):
    """The cpu backend's backward (csrc/autograd.cpp) runs the fused db + dtop op either way; dx
    and dW come from ATen's convolution_backward, or under create_graph=True (they will be
    differentiated again) from einsum, and the gradients then carry a graph."""
    x, w, b, top = make_lateral_case(1, 6, 4, (4, 4), (2, 2), torch.float32, "cpu", "nchw")
    ins = [t.requires_grad_() for t in (x, w, b, top)]
    y = fused_fpn.lateral(*ins, backend="cpu")
    with RecordOps() as rec:
        grads = torch.autograd.grad((y * y).sum(), ins, create_graph=create_graph)
    assert "fused_fpn.lateral_grad_bias_top.default" in rec.ops, rec.ops
    assert ("aten.convolution_backward.default" in rec.ops) != create_graph, rec.ops
    assert all(g.requires_grad == create_graph for g in grads)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,top_hw", [((2, 3, 5, 6), (3, 4)), ((2, 3, 5, 6), (9, 11)), ((2, 3, 5, 6), (0, 0)),
                                          ((1, 2, 82, 3), (2, 1))], ids=["up", "down", "no_top", "float_rule"])
def test_grad_bias_top_op_is_differentiable(device, layout, shape, top_hw):
    """The db + dtop op called directly: first and second derivatives (gradcheck in fp64 on CPU;
    on CUDA, fp32 against the reference's autograd). "float_rule": 2 -> 82 rows, where an integer
    index rule would gather other rows than ATen's float32 one."""
    if device == "cuda" and not fused_fpn.cuda_built():
        pytest.skip("_C built without CUDA kernels")
    from fpn_testing import make_input
    fused_fpn._ops.register()
    op = torch.ops.fused_fpn.lateral_grad_bias_top
    if device == "cpu":
        dy = make_input(shape, torch.float64, device, layout).requires_grad_()
        assert torch.autograd.gradcheck(lambda g: op(g, *top_hw), [dy])
        assert torch.autograd.gradgradcheck(lambda g: op(g, *top_hw), [dy])
        return
    dy = make_input(shape, torch.float32, device, layout).requires_grad_()
    dy64 = dy.detach().double().requires_grad_()
    cot = [torch.randn(t.shape, generator=torch.Generator().manual_seed(2)) for t in op(dy64.cpu(), *top_hw)]

    def nonempty(outputs, cotangents):   # no top: dtop is [N, C, 0, 0] (the reference's has no grad_fn)
        pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.numel() > 0]
        return [o for o, _ in pairs], [c for _, c in pairs]
    outs, cots = nonempty(op(dy, *top_hw), [c.to(device, torch.float32) for c in cot])
    got = torch.autograd.grad(outs, dy, cots)[0]
    outs, cots = nonempty(lateral_grad_bias_top_reference(dy64, *top_hw), [c.to(device) for c in cot])
    want = torch.autograd.grad(outs, dy64, cots)[0]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", backend_device_params())
def test_autograd_engine_features(device, backend):
    """What autograd users rely on, on every backend: an in-place change of a saved input after the
    forward is an error at backward; retain_graph allows a second backward (and its absence forbids
    one); activation checkpointing (both variants) and saved-tensor hooks give the plain gradients."""
    from torch.utils.checkpoint import checkpoint
    case = make_lateral_case(2, 6, 4, (5, 7), (3, 4), torch.float32, device, "nchw")

    def leaves():
        return [t.detach().clone().requires_grad_() for t in case]

    def lateral(*a):
        return fused_fpn.lateral(*a, backend=backend)

    plain = leaves()
    lateral(*plain).square().sum().backward()

    a, w, b, top = leaves()
    x = a * 1.0
    y = lateral(x, w, b, top)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

    ins = leaves()
    y = lateral(*ins)
    y.square().sum().backward(retain_graph=True)
    y.square().sum().backward()
    torch.testing.assert_close(ins[0].grad, 2 * plain[0].grad)
    with pytest.raises(RuntimeError, match="second time"):
        y.square().sum().backward()

    for reentrant in (False, True):
        ins = leaves()
        checkpoint(lambda *a: lateral(*a).square(), *ins, use_reentrant=reentrant).sum().backward()
        for got, want in zip(ins, plain):
            torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)

    ins, packed = leaves(), []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t.clone(), lambda t: t):
        y = lateral(*ins)
    assert packed, "the forward saved nothing through the hooks"
    y.square().sum().backward()
    for got, want in zip(ins, plain):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)


# the interpreter's triton too (small shapes): backend_device_params leaves it out on CPU
_WITH_INTERPRETED_TRITON = backend_device_params() + (
    [pytest.param("cpu", "triton", id="cpu-triton")] if "triton" in fused_fpn.available_backends("cpu") else [])


@pytest.mark.parametrize("device,backend", _WITH_INTERPRETED_TRITON)
@pytest.mark.parametrize("grad_of", ["top", "bias and top"])
def test_x_and_weight_are_kept_where_eager_keeps_them(device, backend, grad_of):
    """x and W are kept where eager's conv node keeps them: when x, W or bias requires grad. With only
    top requiring grad (a frozen lateral conv) eager makes no conv node and the forward keeps neither
    (db and dtop read the incoming gradient alone), so an in-place change of x after the forward, or x
    and W made under inference mode, still give top's gradient, equal to float64 eager's (all backends
    kept both once, and raised). With bias requiring grad too, both are kept, and each of those raises
    as it does in eager, and so does a second backward without retain_graph."""
    F = torch.nn.functional
    if backend_supports(backend, device, torch.float32) is not None:
        pytest.skip(f"{backend} cannot run fp32 on {device}")
    x, w, b, top = make_lateral_case(2, 6, 4, (5, 7), (3, 4), torch.float32, device, "nchw")
    with torch.inference_mode():
        x_inf, w_inf = x.clone(), w.clone()

    def run(x, w, change_x, backend, watch=False):   # backend None: eager's conv2d + interpolate + add
        b_, top_ = b.clone().requires_grad_(grad_of == "bias and top"), top.clone().requires_grad_()
        packed = []   # what the forward saves (watched: saved-tensor hooks skip the version check)
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t)
        with hooks if watch else contextlib.nullcontext():
            y = (fused_fpn.lateral(x, w, b_, top_, backend=backend) if backend else
                 F.conv2d(x, w[:, :, None, None], b_) + F.interpolate(top_, size=(5, 7), mode="nearest"))
        if change_x:
            x.add_(1.0)
        y.square().sum().backward()
        return [t.grad for t in (b_, top_) if t.requires_grad], packed

    if grad_of == "top":
        top64 = top.double().requires_grad_()
        y64 = F.conv2d(x.double(), w.double()[:, :, None, None], b.double()) + \
            F.interpolate(top64, size=(5, 7), mode="nearest")
        y64.square().sum().backward()
        for xi, wi, change in ((x.clone(), w, True), (x_inf, w_inf, False)):
            (got,), _ = run(xi, wi, change, backend)
            torch.testing.assert_close(got.double(), top64.grad, atol=1e-4, rtol=1e-4)
            _, packed = run(xi.clone(), wi, False, backend, watch=True)
            kept = packed if backend != "torch" else [t for t in packed if t.shape in (x.shape, w.shape)]
            assert kept == [], f"the forward kept {[tuple(t.shape) for t in kept]}"   # ("torch": nearest's indices)
    else:
        for make, change, error in ((lambda: (x.clone(), w), True, "modified by an inplace operation"),
                                    (lambda: (x_inf, w_inf), False, "Inference tensors cannot be saved")):
            with pytest.raises(RuntimeError, match=error):
                run(*make(), change, None)
            with pytest.raises(RuntimeError, match=error):
                run(*make(), change, backend)
        y = fused_fpn.lateral(x, w, b.clone().requires_grad_(), top.clone().requires_grad_(), backend=backend)
        y.sum().backward()
        with pytest.raises(RuntimeError, match="second time"):
            y.sum().backward()
    x_changed, w_grad = x.clone(), w.clone().requires_grad_()
    y = fused_fpn.lateral(x_changed, w_grad, b, top, backend=backend)
    x_changed.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ---- forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) and torch.func.grad -------------

TANGENT_SETS = {"all": (0, 1, 2, 3), "x_and_top": (0, 3), "weight_only": (1,)}


@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("tangent_set", list(TANGENT_SETS))
@pytest.mark.parametrize("api", ["forward_ad", "func_jvp"])
def test_forward_mode_ad_matches_reference(device, backend, layout, tangent_set, api):
    """The output's tangent for tangents on some inputs (the others constant), against the float64
    reference's jvp; a tangent must never be dropped (None) or wrong."""
    import torch.autograd.forward_ad as fwAD
    from fused_fpn.reference import lateral_reference
    primals = make_lateral_case(2, 12, 8, (9, 13), (5, 7), torch.float32, device, layout)
    gen = torch.Generator().manual_seed(4)
    keep = TANGENT_SETS[tangent_set]
    tangents = [torch.randn(t.shape, generator=gen).to(device) if i in keep else torch.zeros_like(t)
                for i, t in enumerate(primals)]
    if api == "forward_ad":
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) if i in keep else p for i, (p, t) in enumerate(zip(primals, tangents))]
            out, tangent = fwAD.unpack_dual(fused_fpn.lateral(*duals, backend=backend))
            assert tangent is not None, "the tangent was dropped"
    else:
        out, tangent = torch.func.jvp(lambda *a: fused_fpn.lateral(*a, backend=backend), tuple(primals),
                                      tuple(tangents))
    ref, ref_tangent = torch.func.jvp(lateral_reference, tuple(to64(*primals)), tuple(to64(*tangents)))
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tangent.double(), ref_tangent, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_torch_backend_top_gradient_rounds_once_as_eager(device, dtype, layout):
    """In float16 / bfloat16 eager's upsample_nearest backward sums each top pixel's preimage in
    float32 and rounds once; so do the "torch" backend (what "auto" runs inside torch.func.grad), under
    torch.func.grad too, and the reference adjoint of the double backward: top's gradient is eager's
    bit for bit, as the cpu backend's. (A gather in the half dtype rounded after every add: in bfloat16
    a third of the elements differed, up to 2.5x eager's error.)"""
    x, w, b, _ = make_lateral_case(1, 16, 8, (37, 50), None, dtype, device, layout, with_top=False)
    g = torch.Generator().manual_seed(3)
    top = torch.randn(1, 8, 19, 25, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(1, 8, 37, 50, generator=g).to(device=device, dtype=dtype)

    (expected,) = torch.autograd.grad(eager_lateral(x, w, b, top.requires_grad_()), top, dy)
    backends = ["torch"] + (["cpu"] if device == "cpu" and "cpu" in fused_fpn.available_backends(device) else [])
    for backend in backends:   # (the cpu backend's fused db + dtop pass sums in float32 too)
        (got,) = torch.autograd.grad(fused_fpn.lateral(x, w, b, top, backend=backend), top, dy)
        assert torch.equal(got, expected), backend
    _, vjp = torch.func.vjp(lambda t: fused_fpn.lateral(x, w, b, t), top.detach())
    assert torch.equal(vjp(dy)[0], expected)
    assert torch.equal(lateral_grad_bias_top_reference(dy, 19, 25)[1], expected)


@pytest.mark.parametrize("device", DEVICES)
def test_func_grad_runs_the_reference_under_auto_and_rejects_fused_backends(device):
    """torch.func.grad cannot run the fused backends' autograd (a C++ autograd Function, or a custom
    op): "auto" takes the "torch" reference there, an explicit fused backend gets a clear ValueError."""
    x, w, b, top = make_lateral_case(2, 6, 4, (5, 7), (3, 4), torch.float32, device, "nchw")

    def loss(x, backend):
        return fused_fpn.lateral(x, w, b, top, backend=backend).square().sum()

    got = torch.func.grad(loss)(x, "auto")
    xg = x.clone().requires_grad_()
    loss(xg, "torch").backward()
    torch.testing.assert_close(got, xg.grad)
    fused = [n for n in fused_fpn.available_backends(device) if n != "torch"]
    for name in fused:
        with pytest.raises(ValueError, match=rf"backend '{name}' cannot run inside torch.func.grad"):
            torch.func.grad(loss)(x, name)
    assert fused_fpn.lateral(x, w, b, top).requires_grad is False   # outside the transform: unchanged


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("hw,top_hw", [((9, 13), (5, 7)), ((5, 6), (9, 11)), ((8, 8), (4, 4)), ((3, 3), (0, 0))])
def test_grad_bias_top_op_matches_reference(device, dtype, layout, hw, top_hw):
    if device == "cuda" and not fused_fpn.cuda_built():
        pytest.skip("_C built without CUDA kernels")
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("CUDA kernels take fp16/bf16/fp32")
    from fpn_testing import make_input
    dy = make_input((2, 12, *hw), dtype, device, layout, generator=torch.Generator().manual_seed(1))
    db, dtop = torch.ops.fused_fpn.lateral_grad_bias_top(dy, *top_hw)
    rdb, rdtop = lateral_grad_bias_top_reference(dy.double(), *top_hw)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(db.double(), rdb, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(dtop.double(), rdtop, atol=tol * 10, rtol=tol)
    assert dtop.shape == (2, 12, *top_hw)


def _cl_strided_channels(shape, dtype, generator):
    """channels_last-like (stride(1) < stride(3)) but with channel stride 2: every other channel."""
    n, c, h, w = shape
    wide = torch.randn((n, 2 * c, h, w), generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
    t = wide[:, ::2]
    assert t.stride(1) == 2 and t.stride(1) < t.stride(3)
    return t


# The CPU pass's code paths (csrc/cpu/lateral_cpu.cpp, GradBiasTopPass): pixels innermost with an
# exact 2x, 1x or 3x column fold or a general one, channels innermost with several column blocks per
# top row (C * W large), empty preimages (down-sampling), strided channels / pixels.
GBT_CPU_CASES = {
    "nchw_2x": ((2, 12, 8, 10), (4, 5), "nchw"),
    "nchw_same_size": ((2, 5, 7, 9), (7, 9), "nchw"),
    "nchw_3x": ((1, 5, 9, 12), (3, 4), "nchw"),
    "nchw_general_down": ((2, 6, 5, 6), (9, 11), "nchw"),
    "nchw_strided_w": ((2, 6, 9, 13), (5, 7), "noncontig"),
    "cl_column_blocks_2x": ((1, 300, 4, 600), (2, 300), "channels_last"),
    "cl_column_blocks_general": ((1, 260, 3, 530), (2, 251), "channels_last"),
    "cl_down": ((2, 7, 5, 6), (9, 11), "channels_last"),
    "cl_strided_channels": ((2, 9, 6, 8), (3, 4), "cl_strided"),
    "cl_no_top": ((2, 70, 5, 7), (0, 0), "channels_last"),
}


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", list(GBT_CPU_CASES))
def test_grad_bias_top_cpu_paths_match_reference_and_every_thread_count(case, dtype):
    from fpn_testing import make_input
    shape, top_hw, layout = GBT_CPU_CASES[case]
    gen = torch.Generator().manual_seed(3)
    dy = _cl_strided_channels(shape, dtype, gen) if layout == "cl_strided" else make_input(shape, dtype, "cpu", layout, gen)
    db, dtop = torch.ops.fused_fpn.lateral_grad_bias_top(dy, *top_hw)
    rdb, rdtop = lateral_grad_bias_top_reference(dy.double(), *top_hw)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    scale = max(1.0, rdb.abs().max().item())
    torch.testing.assert_close(db.double(), rdb, atol=tol * 10 * scale, rtol=tol)
    torch.testing.assert_close(dtop.double(), rdtop, atol=tol * 10, rtol=tol)
    assert dtop.shape == (shape[0], shape[1], *top_hw)
    # the work split does not depend on the thread count: bitwise the same results with 1 thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        db1, dtop1 = torch.ops.fused_fpn.lateral_grad_bias_top(dy, *top_hw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(db1, db) and torch.equal(dtop1, dtop)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("with_bias,with_top", [(True, True), (False, False), (True, False)])
def test_opcheck_lateral(device, layout, with_bias, with_top):
    if device == "cuda" and not fused_fpn.cuda_built():
        pytest.skip("_C built without CUDA kernels")
    x, w, b, top = make_lateral_case(2, 6, 5, (5, 7), (3, 4), torch.float32, device, layout,
                                     with_bias=with_bias, with_top=with_top)
    args = (x.requires_grad_(), w.requires_grad_(), b, top)
    torch.library.opcheck(torch.ops.fused_fpn.lateral.default, args)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("top_hw", [(3, 4), (0, 0)])
def test_opcheck_grad_bias_top(device, layout, top_hw):
    if device == "cuda" and not fused_fpn.cuda_built():
        pytest.skip("_C built without CUDA kernels")
    from fpn_testing import make_input
    dy = make_input((2, 6, 5, 7), torch.float32, device, layout)
    torch.library.opcheck(torch.ops.fused_fpn.lateral_grad_bias_top.default, (dy, *top_hw))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["dx-dw", "dx", "dw"])
@pytest.mark.parametrize("use_gemm", [False, True], ids=["default", "gemm"])
def test_opcheck_conv1x1_backward(device, need, use_gemm):
    """opcheck of ``fused_fpn::conv1x1_backward``, every check. The default path on CPU
    differentiates through aten's convolution_backward (on other devices the default is the GEMMs of
    use_gemm, csrc/autograd.cpp); where aten's own op fails opcheck's dynamic-shape AOT check
    (torch 2.11: its double backward calls numel() on symbolic sizes), ours must fail it with aten's
    error and pass every other check; where aten's passes, and on the GEMM path, ours must pass it."""
    from fpn_testing import make_input
    x = make_input((2, 6, 5, 7), torch.float32, device, "channels_last").requires_grad_()
    grad = make_input((2, 4, 5, 7), torch.float32, device, "channels_last")
    w = torch.randn((4, 6), generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
    op, args = torch.ops.fused_fpn.conv1x1_backward.default, (grad, x, w, *need, use_gemm)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    runs_convolution_backward = device == "cpu" and not use_gemm
    aten_error = _aten_conv_backward_dynamic_aot_error(device) if runs_convolution_backward else None
    if aten_error is not None:
        with pytest.raises(Exception) as failed:
            torch.library.opcheck(op, args, test_utils=("test_aot_dispatch_dynamic",))
        assert aten_error in str(failed.value), f"not aten's failure ({aten_error!r}): {failed.value}"
        checks = checks[:-1]
    torch.library.opcheck(op, args, test_utils=checks)



@needs_ext
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("device,use_gemm,dtype", [("cpu", False, torch.float32), ("cpu", True, torch.float32),
                                                   ("cuda", False, torch.float32), ("cuda", False, torch.float16)],
                         ids=["cpu-default", "cpu-gemm", "fake_cuda-default", "fake_cuda-default-fp16"])
def test_conv1x1_backward_keeps_sizes_symbolic(layout, device, use_gemm, dtype):
    """``fused_fpn::conv1x1_backward`` traced on fake tensors whose N, H and W are symbols pins none of
    them, on every path: convolution_backward (CPU), the GEMMs (use_gemm on CPU, and the default on
    fake CUDA tensors, no GPU needed: what every backward of the cuda backend runs). The GEMM path
    once read x's strides as plain ints to pick the memory format, which pinned N*Cin*H*W, H*W and W
    to the traced sizes (seen on an H200, 2026-12-04, in
    test_forward_and_backward_keep_sizes_symbolic[cuda-cuda]); with torch 2.11, at::matmul pinned N
    and H*W in the NCHW path (CI's test-compat). One pin is allowed, and only where it is made on
    purpose: N on the NCHW fp16 / bf16 CUDA path, whose dW goes through bmm.dtype (fp32 accumulation),
    whose fake implementation reads the batch as an int (torch 2.14 pins it, 2.11 failed)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq
    from fpn_testing import SymbolicSizes
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    sym = SymbolicSizes()

    def case(shape, other_shape):
        return sym.tensor(torch.randn(shape).to(dtype).contiguous(memory_format=fmt), (0, 2, 3),
                          torch.randn(other_shape).contiguous(memory_format=fmt))
    x, grad = case((2, 8, 40, 44), (3, 8, 37, 29)), case((2, 4, 40, 44), (3, 4, 37, 29))
    w = sym.tensor(torch.randn(4, 8).to(dtype))
    batch_symbols = (x.shape[0].node.expr, grad.shape[0].node.expr)
    with sym.mode:
        x, grad, w = (t.to(device) for t in (x, grad, w))
        dx, dw = torch.ops.fused_fpn.conv1x1_backward(grad, x, w, True, True, use_gemm)
    assert tuple(dx.shape) == tuple(x.shape) and tuple(dw.shape) == (4, 8)
    assert (dx.device.type, dx.dtype, dw.dtype) == (device, dtype, dtype)
    # x's own (dense, fmt) strides, compared as expressions: torch 2.11's is_contiguous(channels_last)
    # is False for convolution_backward's symbolic output although its strides are channels_last
    assert statically_known_true(sym_eq(dx.stride(), x.stride())), f"dx strides {dx.stride()}, x's {x.stride()}"
    half_cuda_nchw = device == "cuda" and dtype != torch.float32 and layout == "nchw"
    sym.assert_none_pinned(pinned_ok=batch_symbols if half_cuda_nchw else ())


_ATEN_CONV_BACKWARD_ERRORS = {}


def _aten_conv_backward_dynamic_aot_error(device):
    """None when aten's convolution_backward (the same 1x1 problem) passes opcheck's
    test_aot_dispatch_dynamic on ``device``, else the error it fails with (this torch's limitation)."""
    if device not in _ATEN_CONV_BACKWARD_ERRORS:
        g = torch.Generator().manual_seed(2)
        x, dy, w = (torch.randn(shape, generator=g).to(device).requires_grad_()
                    for shape in ((2, 6, 5, 7), (2, 4, 5, 7), (4, 6, 1, 1)))
        args = (dy, x, w, [4], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])
        try:
            torch.library.opcheck(torch.ops.aten.convolution_backward.default, args,
                                  test_utils=("test_aot_dispatch_dynamic",))
            _ATEN_CONV_BACKWARD_ERRORS[device] = None
        except Exception as exc:  # noqa: BLE001 - the message is the answer
            _ATEN_CONV_BACKWARD_ERRORS[device] = str(exc).split(" failed with ", 1)[-1].splitlines()[0]
    return _ATEN_CONV_BACKWARD_ERRORS[device]


@pytest.mark.parametrize("device,backend", backend_device_params())
def test_compile_fullgraph_lateral_matches_eager(device, backend):
    torch._dynamo.reset()
    x, w, b, top = make_lateral_case(2, 16, 8, (9, 13), (5, 7), torch.float32, device, "channels_last")

    def fn(x, w, b, top):
        return fused_fpn.lateral(x, w, b, top, backend=backend) * 2.0

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b, top), fn(x, w, b, top), atol=1e-5, rtol=1e-5)


# ---- dx and dW as GEMMs (the C++ ops' backward on non-CPU devices) ---------------------------------

@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["dx-dw", "dx", "dw"])
def test_gemm_conv1x1_backward_matches_reference(dtype, layout, batch, need):
    """``fused_fpn::conv1x1_backward`` with use_gemm (what the "cuda" backend's backward runs for dx and dW, so
    that they are deterministic without torch.use_deterministic_algorithms) on CPU tensors: the
    float64 autograd of conv2d, dx in x's memory format, dW in weight's dtype."""
    from fpn_testing import make_input
    from fused_fpn._layout import output_memory_format
    gen = torch.Generator().manual_seed(7)
    x = make_input((batch, 13, 6, 9), dtype, "cpu", layout, gen)
    grad = make_input((batch, 10, 6, 9), dtype, "cpu", layout, gen)
    weight = (torch.randn((10, 13), generator=gen) / 13 ** 0.5).to(dtype)
    dx, dw = torch.ops.fused_fpn.conv1x1_backward(grad, x, weight, *need, True)
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    torch.nn.functional.conv2d(x64, w64[:, :, None, None]).backward(grad.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    if need[0]:
        assert dx.dtype == dtype and dx.is_contiguous(memory_format=output_memory_format(x))
        torch.testing.assert_close(dx.double(), x64.grad, atol=tol * 10, rtol=tol)
    else:
        assert dx is None
    if need[1]:
        assert dw.dtype == dtype and dw.shape == weight.shape
        torch.testing.assert_close(dw.double(), w64.grad, atol=tol * 10 * batch, rtol=tol)
    else:
        assert dw is None


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_backward_on_cuda_tensors_runs_gemms_not_cudnn(dtype, layout):
    """Traced with fake CUDA tensors (no GPU needed): the backward of dx and dW on CUDA runs
    mm / bmm (deterministic cuBLAS), with fp32 accumulation for fp16 / bf16 (the ``out_dtype``
    overloads), never cuDNN's convolution_backward; shapes, dtypes and memory formats as eager's."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    with FakeTensorMode():
        x = torch.empty(2, 16, 5, 7, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
        grad = torch.empty(2, 8, 5, 7, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
        weight = torch.empty(8, 16, device="cuda", dtype=dtype)
        with RecordOps() as rec:
            dx, dw = torch.ops.fused_fpn.conv1x1_backward(grad, x, weight, True, True, False)
    assert dx.shape == x.shape and dx.dtype == dtype and dx.device.type == "cuda"
    assert dx.is_contiguous(memory_format=fmt)
    assert dw.shape == weight.shape and dw.dtype == dtype
    assert not any("convolution" in op for op in rec.ops), rec.ops
    assert any(op.startswith(("aten.mm", "aten.bmm")) for op in rec.ops), rec.ops
    if dtype != torch.float32:
        assert any(op in ("aten.mm.dtype", "aten.bmm.dtype") for op in rec.ops), rec.ops


@needs_ext
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("weight_kind", ["expanded", "transposed_view"])
def test_gemm_conv1x1_backward_with_strided_weights(layout, weight_kind):
    """The GEMM backward with a weight that is not a contiguous [Cout, Cin] matrix."""
    from fpn_testing import make_input
    gen = torch.Generator().manual_seed(8)
    x = make_input((2, 13, 6, 9), torch.float32, "cpu", layout, gen)
    grad = make_input((2, 10, 6, 9), torch.float32, "cpu", layout, gen)
    if weight_kind == "expanded":
        weight = torch.randn((10, 1), generator=gen).expand(10, 13)
    else:
        weight = torch.randn((13, 10), generator=gen).t()
    assert not weight.is_contiguous()
    dx, dw = torch.ops.fused_fpn.conv1x1_backward(grad, x, weight, True, True, True)
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().contiguous().requires_grad_()
    torch.nn.functional.conv2d(x64, w64[:, :, None, None]).backward(grad.double())
    torch.testing.assert_close(dx.double(), x64.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dw.double(), w64.grad, atol=1e-4, rtol=1e-5)
