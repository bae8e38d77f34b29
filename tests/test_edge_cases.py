"""Edge cases of ``fused_fpn.lateral`` that must simply work and match the reference, on every backend
that runs here (the Triton backend on CPU tensors too, under the interpreter, with small sizes).

Complements test_lateral_parity.py / test_autograd_and_ops.py / test_backends_and_errors.py (which
cover: forward parity over dtypes x layouts x a few shapes, batch-expanded x and top, one NaN/Inf
case, batch size 0 forward, requires_grad on top only, bad-input errors for "auto"/"torch"). Here:
1x1 / 1xW / Hx1 spatial sizes with gradients; Cin, Cout in {3, 17, 129} in NCHW, channels_last and a
strided view; stride-0 (expanded) weight, bias, top and x along every dim, with gradients;
torch.no_grad and torch.inference_mode; requires_grad on every subset of the inputs; NaN/Inf
propagation (forward and backward) identical to the reference's masks, including a NaN in a top pixel
nearest down-sampling never reads; batch size 0 with gradients; inputs (values and version counters)
unchanged and no state left after a failed call, per backend; element offsets past 2^31 (huge-stride
views over a lazily allocated 4 GiB storage, so only a few pages are ever touched) and the Triton
launcher's guard on N*H*W >= 2^31.
"""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

import fused_fpn
from fused_fpn._layout import output_memory_format
from fpn_testing import (DEVICES, TOLERANCES, backend_supports, eager_lateral, eager_lateral_any_size,
                         gradient_penalty_grads, make_input, to64)

GRAD_NAMES = ("x", "weight", "bias", "top")

# numpy (the Triton interpreter) warns on the NaN / inf arithmetic these tests do on purpose
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def backend_params():
    """(device, backend) for every backend here, the Triton interpreter on CPU tensors included."""
    params = []
    for device in DEVICES:
        for name in fused_fpn.available_backends(device):
            interp = device == "cpu" and name == "triton"
            params.append(pytest.param(device, name, id=f"{device}-{name}" + ("-interp" if interp else "")))
    return params


BACKENDS = backend_params()


pytestmark = [pytestmark, pytest.mark.usefixtures("no_tf32")]   # + IEEE fp32 on GPUs (conftest)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _case(n, cin, cout, hw, top_hw, device, dtype=torch.float32, layout="nchw", bias=True, seed=0):
    """(x, weight [Cout, Cin], bias, top): unit-scale outputs, x and top in ``layout`` (make_input's:
    "nchw", "channels_last" or "noncontig"). top_hw None: no top."""
    g = _gen(seed)
    x = make_input((n, cin, *hw), dtype, device, layout, generator=g)
    w = (torch.randn((cout, cin), generator=g) / max(cin, 1) ** 0.5).to(device, dtype)
    b = torch.randn((cout,), generator=g).to(device, dtype) if bias else None
    top = make_input((n, cout, *top_hw), dtype, device, layout, generator=g) if top_hw is not None else None
    return x, w, b, top


def _leaves(*ts, requires=(True, True, True, True)):
    """Leaf copies with the inputs' strides (clone() would make a strided view contiguous)."""
    return [None if t is None else
            torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t).requires_grad_(r)
            for t, r in zip(ts, requires)]


def _check_fwd_bwd(backend, inputs, dtype=torch.float32, dy_seed=5):
    """lateral(*inputs) and its gradients (of the inputs that require grad) against the float64
    reference autograd on the same inputs, the reference itself checked against eager's float64
    computation (eager_lateral_any_size: the "torch" backend is the reference); returns the output."""
    out = fused_fpn.lateral(*inputs, backend=backend)

    def leaves64():   # float64 leaves of the inputs, a fresh set per computation (their own grads)
        return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]

    refs, eagers = leaves64(), leaves64()
    ref = fused_fpn.lateral_reference(*refs)
    eager = eager_lateral_any_size(*eagers)
    atol, rtol = TOLERANCES[dtype]
    assert out.shape == ref.shape == eager.shape and out.dtype == dtype
    assert not torch.isnan(out).any(), "output has NaN: an element was not written"
    torch.testing.assert_close(ref.detach(), eager.detach(), atol=1e-12, rtol=1e-12, msg=lambda m: f"reference vs eager: {m}")
    torch.testing.assert_close(out.detach().double(), ref.detach(), atol=atol, rtol=rtol)
    if not out.requires_grad:
        return out
    dy = torch.randn(out.shape, generator=_gen(dy_seed)).to(out.device, dtype)
    out.backward(dy)
    ref.backward(dy.double())
    eager.backward(dy.double())
    for name, t, r, e in zip(GRAD_NAMES, inputs, refs, eagers):
        if t is None or not t.requires_grad:
            continue
        assert t.grad is not None, f"grad of {name} missing"
        assert t.grad.shape == t.shape, f"grad of {name}: shape {tuple(t.grad.shape)}"
        torch.testing.assert_close(r.grad, e.grad, atol=1e-12, rtol=1e-12,
                                   msg=lambda m, name=name: f"grad of {name}, reference vs eager: {m}")
        scale = max(1.0, r.grad.abs().max().item()) if r.grad.numel() else 1.0
        torch.testing.assert_close(t.grad.double(), r.grad, atol=atol * scale, rtol=rtol,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
    return out


# ---- spatial 1x1 / 1xW / Hx1 and channel counts that are no tile multiple ---------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("hw", [(1, 1), (1, 9), (9, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("top_hw", [(1, 1), (3, 5), (2, 1), None], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_degenerate_spatial_sizes(device, backend, hw, top_hw, layout):
    ins = _leaves(*_case(2, 7, 5, hw, top_hw, device, layout=layout))
    out = _check_fwd_bwd(backend, ins)
    assert out.is_contiguous(memory_format=output_memory_format(ins[0]))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("cin,cout", list(itertools.product((3, 17, 129), repeat=2)), ids=lambda c: str(c))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
def test_channel_counts_off_the_tile_sizes(device, backend, cin, cout, layout):
    ins = _leaves(*_case(2, cin, cout, (5, 7), (3, 4), device, layout=layout, seed=cin * 1000 + cout))
    if layout == "noncontig":   # the leaves keep the view's strides
        assert not any(t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) for t in ins[::3])
    _check_fwd_bwd(backend, ins)


# ---- stride-0 (expanded) inputs ----------------------------------------------------------------------

N, CIN, COUT, HW, TOP_HW = 2, 6, 5, (5, 7), (3, 4)
EXPANDED = {
    # name: (shape of the base tensor, which input it expands)
    "weight_over_cin": ("weight", (COUT, 1)),
    "weight_over_cout": ("weight", (1, CIN)),
    "weight_4d_over_cout": ("weight4", (1, CIN, 1, 1)),
    "bias": ("bias", (1,)),
    "top_over_hw": ("top", (N, COUT, 1, 1)),
    "top_over_channels": ("top", (N, 1, *TOP_HW)),
    "top_everything": ("top", (1, 1, 1, 1)),
    "x_over_hw": ("x", (N, CIN, 1, 1)),
    "x_over_channels": ("x", (N, 1, *HW)),
    "x_over_batch_and_w": ("x", (1, CIN, HW[0], 1)),
    # channels_last bases (x channels_last too): the channel stride stays 1 (the C++ kernels' vector paths)
    "x_cl_over_batch": ("x_cl", (1, CIN, *HW)),
    "top_cl_over_batch": ("top_cl", (1, COUT, *TOP_HW)),
    "top_cl_over_h": ("top_cl", (N, COUT, 1, TOP_HW[1])),
}


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("which", list(EXPANDED))
def test_expanded_stride0_inputs_forward_and_backward(device, backend, which):
    """An input that is an expand() of a smaller base (stride 0 along the expanded dims): the value
    and the base's gradient (the sum over the expanded dims) match the reference."""
    role, base_shape = EXPANDED[which]
    cl = role.endswith("_cl")
    role = role.removesuffix("_cl")
    x, w, b, top = _case(N, CIN, COUT, HW, TOP_HW, device, layout="channels_last" if cl else "nchw")
    base = torch.randn(base_shape, generator=_gen(11)).to(device)
    if cl:
        base = base.contiguous(memory_format=torch.channels_last)
    base.requires_grad_()
    full = {"x": x.shape, "weight": w.shape, "weight4": (COUT, CIN, 1, 1), "bias": b.shape, "top": top.shape}[role]
    expanded = base.expand(full)
    assert 0 in expanded.stride() and (not cl or expanded.stride(1) == 1)
    ins = {"x": x, "weight": w, "bias": b, "top": top}
    ins["weight" if role == "weight4" else role] = expanded
    others = {k: v.detach().clone().requires_grad_() for k, v in ins.items() if v is not expanded}
    args = [others.get(k, expanded) for k in GRAD_NAMES]
    out = fused_fpn.lateral(*args, backend=backend)

    base64 = base.detach().double().requires_grad_()
    others64 = {k: v.detach().double().requires_grad_() for k, v in others.items()}
    args64 = [others64.get(k, base64.expand(full)) for k in GRAD_NAMES]
    ref = fused_fpn.lateral_reference(*args64)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out.detach().double(), ref.detach(), atol=atol, rtol=rtol)
    dy = torch.randn(out.shape, generator=_gen(3)).to(device)
    out.backward(dy)
    ref.backward(dy.double())
    pairs = [("base", base, base64)] + [(k, others[k], others64[k]) for k in others]
    for name, t, r in pairs:
        scale = max(1.0, r.grad.abs().max().item())
        torch.testing.assert_close(t.grad.double(), r.grad, atol=atol * scale, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base_shape", [(N, 1, HW[0], 1), (1, 1, 1, 1)], ids=["over_c_and_w", "over_all"])
@pytest.mark.parametrize("with_top", [False, True], ids=["no_top", "top"])
def test_output_layout_on_a_stride_tie_is_one_rule_for_every_backend(device, base_shape, with_top):
    """x expanded over C and W has channel stride == width stride (0): the layout rule's tie
    (``output_memory_format``: NCHW there). Every backend's output, and the fake (meta) output that
    torch.compile / export plan with, has that rule's strides; and the values are the reference's."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    _, w, b, top = _case(N, CIN, COUT, HW, TOP_HW if with_top else None, device)
    x = torch.randn(base_shape, generator=_gen(4)).to(device).expand(N, CIN, *HW)
    assert x.stride(1) == x.stride(3) == 0
    expected = torch.empty((N, COUT, *HW), memory_format=output_memory_format(x)).stride()
    ref = fused_fpn.lateral_reference(*to64(x, w, b, top))
    for backend in fused_fpn.available_backends(device):
        out = fused_fpn.lateral(x, w, b, top, backend=backend)
        assert out.stride() == expected, backend
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, msg=backend)
        with FakeTensorMode() as mode:
            fake = fused_fpn.lateral(*(None if t is None else mode.from_tensor(t) for t in (x, w, b, top)),
                                     backend=backend)
        assert fake.stride() == expected, f"{backend} (fake)"


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("view", ["hw_transposed", "batch_step2"])
def test_permuted_and_batch_strided_views_forward_and_backward(device, backend, view):
    """x and top as views dense in neither NCHW nor channels_last: H and W swapped by a transpose (H's
    stride 1, W's stride H), or every second image of a larger batch (x NCHW, top channels_last)."""
    g = _gen(13)
    if view == "hw_transposed":
        x = torch.randn((N, CIN, HW[1], HW[0]), generator=g).transpose(2, 3)
        top = torch.randn((N, COUT, TOP_HW[1], TOP_HW[0]), generator=g).transpose(2, 3)
    else:
        x = torch.randn((2 * N, CIN, *HW), generator=g)[1::2]
        top = torch.randn((2 * N, COUT, *TOP_HW), generator=g).contiguous(memory_format=torch.channels_last)[::2]
    w, b = torch.randn((COUT, CIN), generator=g) / CIN ** 0.5, torch.randn((COUT,), generator=g)
    assert x.shape == (N, CIN, *HW) and top.shape == (N, COUT, *TOP_HW) and not x.is_contiguous()
    # leaves on the device with the views' strides (a strided buffer, gaps included)
    views = [torch.empty_strided(t.shape, t.stride(), device=device).copy_(t).requires_grad_() for t in (x, w, b, top)]
    assert views[0].stride() == x.stride() and views[3].stride() == top.stride()
    _check_fwd_bwd(backend, views)

# ---- no_grad, inference_mode, requires_grad on some inputs ----------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
def test_no_grad_and_inference_mode(device, backend):
    ins = _leaves(*_case(2, 6, 5, (5, 7), (3, 4), device))
    expected = fused_fpn.lateral(*ins, backend=backend)
    assert expected.grad_fn is not None
    with torch.no_grad():
        out = fused_fpn.lateral(*ins, backend=backend)
    assert out.grad_fn is None and not out.requires_grad
    assert torch.equal(out, expected.detach())
    with torch.inference_mode():
        out = fused_fpn.lateral(*ins, backend=backend)
        assert out.grad_fn is None and not out.requires_grad and out.is_inference()
        assert torch.equal(out, expected.detach())
        inf_ins = [t.detach().clone() for t in ins]           # inference tensors as inputs
        out2 = fused_fpn.lateral(*inf_ins, backend=backend)
        assert out2.is_inference() and torch.equal(out2, expected.detach())
    # nothing left behind: autograd works again after leaving the modes
    after = fused_fpn.lateral(*ins, backend=backend)
    assert after.grad_fn is not None
    after.sum().backward()
    assert all(t.grad is not None for t in ins)


SUBSETS = list(itertools.product((False, True), repeat=4))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("requires", SUBSETS,
                         ids=lambda r: "+".join(n for n, q in zip(GRAD_NAMES, r) if q) or "none")
def test_requires_grad_on_each_subset_of_inputs(device, backend, requires):
    ins = _leaves(*_case(2, 6, 5, (5, 7), (3, 4), device), requires=requires)
    out = _check_fwd_bwd(backend, ins)
    assert out.requires_grad == any(requires)
    assert (out.grad_fn is not None) == any(requires)
    for name, t, r in zip(GRAD_NAMES, ins, requires):
        if not r:
            assert t.grad is None, f"{name} does not require grad but got one"


# ---- NaN / Inf propagation --------------------------------------------------------------------------

def _assert_same_special_values(out, ref, atol=1e-4, rtol=1e-4):
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN positions differ from the reference"
    assert torch.equal(torch.isposinf(out), torch.isposinf(ref)), "+inf positions differ from the reference"
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref)), "-inf positions differ from the reference"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite].double(), ref[finite].double(), atol=atol, rtol=rtol)


def _poison(x, w, b, top):
    """Special values in every input, each reaching the output by a different route."""
    nan, inf = float("nan"), float("inf")
    x[0, 1, 2, 3] = nan               # a NaN pixel: NaN in every output channel there
    x[1, 0, 0, 0] = inf               # +inf times weights of both signs: +-inf per channel
    w[:, 0] = torch.where(torch.arange(w.shape[0], device=w.device) % 2 == 0, 1.0, -1.0).to(w.dtype)
    w[2, 0] = 0.0                      # inf * 0 = NaN in channel 2 at x[1, :, 0, 0]
    x[1, 3, 4, 6] = -inf
    w[1, 2] = nan                      # a NaN weight: channel 1 NaN everywhere
    b[3] = -inf                        # channel 3 -inf everywhere ...
    top[0, 3, 0, 0] = inf              # ... except +inf + -inf = NaN where top's (0, 0) is read
    top[1, 4, 1, 1] = inf
    return x, w, b, top


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("top_hw", [(3, 4), (9, 11)], ids=["upsample", "downsample"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nan_and_inf_propagate_exactly_as_the_reference(device, backend, top_hw, layout):
    x, w, b, top = _poison(*_case(2, 5, 6, (5, 7), top_hw, device, layout=layout))
    if top_hw == (9, 11):
        # a top pixel that nearest down-sampling (9 -> 5, 11 -> 7) never reads: must not leak
        unread_h = sorted(set(range(9)) - set(fused_fpn.nearest_source_indices(9, 5).tolist()))
        unread_w = sorted(set(range(11)) - set(fused_fpn.nearest_source_indices(11, 7).tolist()))
        top[1, 0, unread_h[0], unread_w[0]] = float("nan")
    out = fused_fpn.lateral(x, w, b, top, backend=backend)
    ref = fused_fpn.lateral_reference(x, w, b, top)
    assert torch.isnan(ref).any() and torch.isposinf(ref).any() and torch.isneginf(ref).any()
    _assert_same_special_values(out, ref)
    if top_hw == (9, 11):   # (image 1, channel 0 has infs but no NaN of its own)
        assert not torch.isnan(ref[1, 0]).any() and torch.isinf(ref[1, 0]).any()
        assert not torch.isnan(out[1, 0]).any(), "a top pixel that is never read leaked into the output"


# Where the sum is rounded to fp16: once (triton, cuda: fp32 accumulator + bias + top, then fp16) or
# twice (conv + bias first, as eager's conv2d + add: torch, and cpu, whose tile GEMM is ATen's conv2d
# with the bias).
ROUNDS_ONCE = {"triton", "cuda"}


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fp16_sum_past_the_fp16_range_before_the_top_is_added(device, backend, layout):
    """conv = 70000 (past fp16's 65504), top = -20000: eager's conv2d output is inf, and so is the sum;
    a backend that rounds once gives fp16(50000) = 49984, the float64 truth rounded (README, Numerics)."""
    if backend_supports(backend, device, torch.float16) is not None:
        pytest.skip(f"{backend} does not take fp16 on {device}")
    x = torch.full((2, 2, 5, 7), 200.0, dtype=torch.float16, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.full((3, 2), 175.0, dtype=torch.float16, device=device)
    top = torch.full((2, 3, 3, 4), -20000.0, dtype=torch.float16, device=device)
    out = fused_fpn.lateral(x, w, None, top, backend=backend)
    if backend in ROUNDS_ONCE:
        assert torch.equal(out, torch.full_like(out, 49984.0))
    else:
        eager = eager_lateral(x, w, None, top)
        assert torch.isposinf(eager).all() and torch.equal(out, eager)
    # conv = 70000 with a bias of -6000 is in range once the bias is in (64000). Eager's conv2d adds
    # the bias before rounding on CPU (64000), while on CUDA ATen adds it to cuDNN's rounded output
    # (inf - 6000 = inf): torch and cpu give eager's, the backends that round once 64000 everywhere.
    # (The cpu kernel once added the bias in its epilogue, after rounding the conv to inf.)
    bias = torch.full((3,), -6000.0, dtype=torch.float16, device=device)
    zero_top = torch.zeros_like(top)
    out = fused_fpn.lateral(x, w, bias, zero_top, backend=backend)
    eager = eager_lateral(x, w, bias, zero_top)
    if device == "cpu":
        assert torch.equal(eager, torch.full_like(eager, 64000.0))
    expected = torch.full_like(out, 64000.0) if backend in ROUNDS_ONCE else eager
    assert torch.equal(out, expected)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("top_hw", [(3, 4), (9, 11)], ids=["upsample", "downsample"])
def test_nan_and_inf_in_the_incoming_gradient_propagate_as_in_the_reference(device, backend, top_hw):
    """A NaN / inf in dy reaches the gradients exactly where the reference's autograd puts it."""
    x, w, b, top = _case(2, 5, 6, (5, 7), top_hw, device)
    ins = _leaves(x, w, b, top)
    refs = [t.detach().double().requires_grad_() for t in ins]
    out = fused_fpn.lateral(*ins, backend=backend)
    ref = fused_fpn.lateral_reference(*refs)
    dy = torch.randn(out.shape, generator=_gen(9)).to(device)
    dy[0, 2, 1, 3] = float("nan")
    dy[1, 4, 4, 0] = float("inf")
    dy[1, 4, 4, 1] = -float("inf")    # same top preimage (up-sampling) -> inf - inf = NaN there
    out.backward(dy)
    ref.backward(dy.double())
    for name, t, r in zip(GRAD_NAMES, ins, refs):
        _assert_same_special_values(t.grad, r.grad.to(t.dtype))


# ---- empty batch with gradients -----------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("with_top,with_bias,weight4", [(True, True, False), (False, False, False),
                                                        (True, False, True)])
def test_batch_size_zero_with_requires_grad(device, backend, layout, with_top, with_bias, weight4):
    x, w, b, top = _case(0, 6, 5, (5, 7), (3, 4) if with_top else None, device, layout=layout, bias=with_bias)
    if weight4:
        w = w[:, :, None, None]
    ins = _leaves(x, w, b, top)
    out = fused_fpn.lateral(*ins, backend=backend)
    assert out.shape == (0, 5, 5, 7) and out.requires_grad
    out.sum().backward()
    for name, t in zip(GRAD_NAMES, ins):
        if t is None:
            continue
        assert t.grad is not None, f"grad of {name} missing"
        assert t.grad.shape == t.shape, f"grad of {name}: shape {tuple(t.grad.shape)} != {tuple(t.shape)}"
        assert torch.equal(t.grad, torch.zeros_like(t)), f"grad of {name} must be zeros (no pixels)"


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("cout,hw,top_hw", [(5, (0, 7), (3, 4)), (0, (5, 7), (3, 4)), (5, (0, 7), (0, 4)),
                                            (5, (6, 0), (3, 0)), (0, (5, 7), (3, 0))],
                         ids=["h0", "cout0", "h0_top_h0", "w0_top_w0", "cout0_top_w0"])
def test_empty_spatial_size_or_no_output_channels_with_requires_grad(device, backend, cout, hw, top_hw):
    """No output elements: every gradient is zeros of its input's shape, including a top with no pixels
    along one axis, which the forward accepts when the output has none."""
    x, w, b, top = _case(2, 6, cout, hw, top_hw, device)
    ins = _leaves(x, w, b, top)
    out = fused_fpn.lateral(*ins, backend=backend)
    assert out.shape == (2, cout, *hw)
    out.sum().backward()
    for name, t in zip(GRAD_NAMES, ins):
        assert t.grad is not None and t.grad.shape == t.shape, f"grad of {name}"
        assert torch.equal(t.grad, torch.zeros_like(t)), f"grad of {name} must be zeros"


DEGENERATE = {"batch0": (0, 3, 4, (5, 6)), "cin0": (2, 0, 4, (5, 6)), "cout0": (2, 3, 0, (5, 6)),
              "h0": (2, 3, 4, (0, 6)), "1x1": (1, 3, 4, (1, 1))}


@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("which", list(DEGENERATE))
def test_forward_mode_and_double_backward_on_degenerate_sizes(device, backend, which):
    """Empty batch / channels / rows and a 1x1 map: the forward-mode tangent and the gradients of a
    gradient penalty (create_graph=True) against the float64 reference's."""
    import torch.autograd.forward_ad as fwAD
    n, cin, cout, hw = DEGENERATE[which]
    primals = _case(n, cin, cout, hw, (3, 4), device)
    tangents = _case(n, cin, cout, hw, (3, 4), device, seed=1)

    def tangent_and_penalty_grads(fn, ps, ts):
        with fwAD.dual_level():
            _, tangent = fwAD.unpack_dual(fn(*[fwAD.make_dual(p, t) for p, t in zip(ps, ts)]))
        first, second = gradient_penalty_grads(fn, _leaves(*ps))
        return [tangent, *first, *second]

    got = tangent_and_penalty_grads(lambda *a: fused_fpn.lateral(*a, backend=backend), primals, tangents)
    want = tangent_and_penalty_grads(fused_fpn.lateral_reference, to64(*primals), to64(*tangents))
    eager = tangent_and_penalty_grads(eager_lateral_any_size, to64(*primals), to64(*tangents))
    names = ["tangent"] + [f"d{g}" for g in GRAD_NAMES] + [f"d2{g}" for g in GRAD_NAMES]
    for name, r, e in zip(names, want, eager):   # the reference ("torch" backend) checked on its own
        if r is None or e is None or not r.abs().sum() or not e.abs().sum():
            assert (r is None or not r.abs().sum()) and (e is None or not e.abs().sum()), f"{name}: reference vs eager"
            continue
        torch.testing.assert_close(r, e, atol=1e-12, rtol=1e-12, msg=lambda m, name=name: f"{name}, reference vs eager: {m}")
    for name, a, r in zip(names, got, want):
        if r is None or r.numel() == 0 or not r.abs().sum():   # absent or zero: ours must be too
            assert a is None or not a.abs().sum(), name
            continue
        assert a is not None, f"{name} is missing"
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(a.double(), r, atol=1e-4 * scale, rtol=1e-4, msg=name)


# ---- failed calls change nothing ---------------------------------------------------------------------

def _bad_calls(device, backend, x, w, b, top):
    """(description, thunk) pairs that must raise before anything runs."""
    calls = [
        ("bias of the wrong length", lambda: fused_fpn.lateral(x, w, b[:-1], top, backend=backend)),
        ("top with the wrong channel count", lambda: fused_fpn.lateral(x, w, b, top[:, :-1], backend=backend)),
        ("top with the wrong batch", lambda: fused_fpn.lateral(x, w, b, top[:1], backend=backend)),
        ("weight of the wrong Cin", lambda: fused_fpn.lateral(x, w[:, :-1], b, top, backend=backend)),
        ("a 3x3 weight", lambda: fused_fpn.lateral(x, w[:, :, None, None].expand(-1, -1, 3, 3), b, top,
                                                   backend=backend)),
        ("mixed dtypes", lambda: fused_fpn.lateral(x, w, b, top.detach().double(), backend=backend)),
        ("an unknown backend", lambda: fused_fpn.lateral(x, w, b, top, backend="nope")),
    ]
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        if backend_supports(backend, device, dtype) is not None:   # a dtype this backend cannot take
            cast = [t.detach().to(dtype) for t in (x, w, b, top)]
            calls.append((f"unsupported dtype {dtype}", lambda c=cast: fused_fpn.lateral(*c, backend=backend)))
            break
    return calls


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_failed_calls_leave_inputs_and_state_unchanged(device, backend):
    """After each failing call: the inputs' values, version counters (no in-place write at all, even
    of the same values) and .grad are unchanged; and afterwards a good call still gives the same
    output bit for bit and its backward works (no half-built state left behind)."""
    ins = _leaves(*_case(2, 6, 5, (5, 7), (3, 4), device, layout="channels_last"))
    baseline = fused_fpn.lateral(*ins, backend=backend).detach()
    snapshot = [(t.detach().clone(), t._version) for t in ins]
    for what, call in _bad_calls(device, backend, *ins):
        with pytest.raises((ValueError, TypeError)):
            call()
        for name, t, (values, version) in zip(GRAD_NAMES, ins, snapshot):
            assert torch.equal(t.detach(), values), f"{name} changed after a failed call ({what})"
            assert t._version == version, f"{name} was written in place by a failed call ({what})"
            assert t.grad is None, f"{name}.grad set by a failed call ({what})"
    again = fused_fpn.lateral(*ins, backend=backend)
    assert torch.equal(again.detach(), baseline)
    again.sum().backward()
    assert all(t.grad is not None for t in ins)


# ---- element offsets past 2^31 -------------------------------------------------------------------------

STORAGE_ELEMS = 2**31 + 2**16      # fp16: 4 GiB of address space, lazily committed: a few pages are touched


@contextlib.contextmanager
def _no_fill():
    """conftest fills every new tensor with NaN: not the 4 GiB storage (that would touch every page)."""
    old = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = old


# (size, stride, storage_offset) of views whose element offsets (relative to their first element,
# which is what a kernel computes) pass 2^31, while every single stride stays < 2^31 (so a kernel
# that multiplied in 32 bits would wrap: the Triton interpreter computes with numpy int32 then).
BIG = 2**30
X_VIEWS = {
    # N=3, batch stride 2^30+5: image 2 starts at 2^31+10; channels_last-like, (h, w) flatten
    "x_batch_stride": ((3, 3, 2, 3), (BIG + 5, 1, 9, 3), 0),
    # channel stride 2^30+3: channel 2 at 2^31+6; NCHW-like, (h, w) flatten
    "x_channel_stride": ((3, 3, 2, 4), (8, BIG + 3, 4, 1), 1000),
    # row stride 2^30+1: row 2 at 2^31+2; (h, w) do NOT flatten (stride(2) != W * stride(3))
    "x_row_stride": ((3, 2, 3, 2), (4, 1, BIG + 1, 2), 2000),
}
# top [3, 5, 2, 2] with channel stride 2^29+7: channel 4 at 2^31+28
TOP_VIEW = ((3, 5, 2, 2), (4, 2**29 + 7, 2, 1), 3000)


def _offsets(size, stride, offset):
    idx = torch.tensor([offset], dtype=torch.int64)
    for s, st in zip(size, stride):
        idx = (idx[:, None] + torch.arange(s, dtype=torch.int64)[None, :] * st).reshape(-1)
    return idx


def _large_offset_params():
    params = []
    for p in BACKENDS:
        device, backend = p.values
        if backend_supports(backend, device, torch.float16) is None:
            params.append(p)
    return params


@pytest.mark.parametrize("device,backend", _large_offset_params())
@pytest.mark.parametrize("x_view", list(X_VIEWS))
@pytest.mark.parametrize("with_top", [True, False], ids=["top", "no_top"])
def test_element_offsets_past_2_31(device, backend, x_view, with_top):
    """x (and top) are views with huge strides into one 4 GiB fp16 storage: forward and backward
    must read the right elements (index arithmetic in 64 bits) and match the reference computed
    on compact copies of the same values."""
    xs = X_VIEWS[x_view]
    offs = [_offsets(*xs)] + ([_offsets(*TOP_VIEW)] if with_top else [])
    top_off = offs[-1] if with_top else torch.empty(0, dtype=torch.int64)
    assert offs[0].max() - xs[2] > 2**31 and len(set(offs[0].tolist()) | set(top_off.tolist())) == \
        offs[0].numel() + top_off.numel(), "views must pass 2^31 and must not overlap"
    if with_top:
        assert top_off.max() - TOP_VIEW[2] > 2**31
    with _no_fill():
        storage = torch.empty(STORAGE_ELEMS, dtype=torch.float16, device=device)
    g = _gen(21)
    x = storage.as_strided(*xs)
    x.copy_(torch.randn(x.shape, generator=g))
    cin, cout = x.shape[1], TOP_VIEW[0][1]
    w = (torch.randn((cout, cin), generator=g) / cin ** 0.5).to(device, torch.float16)
    b = torch.randn((cout,), generator=g).to(device, torch.float16)
    top = None
    if with_top:
        top = storage.as_strided(*TOP_VIEW)
        top.copy_(torch.randn(top.shape, generator=g))
    ins = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), top.requires_grad_() if with_top else None]
    out = fused_fpn.lateral(*ins, backend=backend)
    refs = [None if t is None else t.detach().double().contiguous().requires_grad_() for t in ins]
    ref = fused_fpn.lateral_reference(*refs)
    atol, rtol = TOLERANCES[torch.float16]
    torch.testing.assert_close(out.detach().double(), ref.detach(), atol=atol, rtol=rtol)
    dy = torch.randn(out.shape, generator=g).to(device, torch.float16)
    out.backward(dy)
    ref.backward(dy.double())
    for name, t, r in zip(GRAD_NAMES, ins, refs):
        if t is not None:
            scale = max(1.0, r.grad.abs().max().item())
            torch.testing.assert_close(t.grad.double(), r.grad, atol=atol * scale, rtol=rtol,
                                       msg=lambda m, n=name: f"grad of {n}: {m}")
    del x, top, ins, storage


@pytest.mark.skipif("triton" not in fused_fpn.available_backends(), reason="triton backend unavailable")
@pytest.mark.parametrize("device", DEVICES[-1:])   # the GPU when there is one (the interpreter's CPU otherwise)
def test_triton_rejects_more_pixels_than_its_int32_indices_allow(device):
    """The Triton kernels index pixels (N*H*W) in 32 bits (element offsets in 64): the launcher must
    refuse N*H*W > MAX_PIXELS = 2^31 - 2^20 (tile ends and dW split bounds pass M by up to 2^20) with
    a ValueError before launching anything. x is a stride-0 expand of one element, so nothing large is
    allocated; exactly MAX_PIXELS pixels pass the check (not run)."""
    from fused_fpn.backends import triton as tb
    from fused_fpn.kernels.limits import MAX_PIXELS
    one = torch.ones((1, 1, 1, 1), device=device)
    w = torch.ones((1, 1), device=device)
    x = one.expand(1, 1, 2**16, 2**15)                  # exactly 2^31 pixels
    with pytest.raises(ValueError, match=r"N\*H\*W must be <= 2\^31 - 2\^20 = 2146435072"):
        fused_fpn.lateral(x, w, backend="triton")
    x = one.expand(2, 1, 2**15, 2**15)                  # 2^31 pixels over a batch
    with pytest.raises(ValueError, match="2\\^31"):
        fused_fpn.lateral(x, w, backend="triton")
    with pytest.raises(ValueError, match="2146435073 pixels"):
        tb.check_forward_args(one.expand(1, 1, MAX_PIXELS + 1, 1), w, None, None)
    tb.check_forward_args(one.expand(1, 1, MAX_PIXELS, 1), w, None, None)   # the limit itself: accepted


@pytest.mark.skipif("triton" not in fused_fpn.available_backends(), reason="triton backend unavailable")
@pytest.mark.parametrize("sms", [1, 108, 132, 148, 5000])
def test_triton_pixel_indices_stay_below_2_31_up_to_the_limit(sms, monkeypatch):
    """The offset math behind MAX_PIXELS, for M up to it: every pixel index the Triton kernels form in
    int32 stays below 2^31. Forward (and dx, the same kernel): the last row tile of any config ends at
    cdiv(M, BLOCK_M) * BLOCK_M. dW: ``_grad_weight_split``'s splits cover [0, M) exactly once, none is
    empty, and split s computes s * rows + rows (its end, before the min with M) and walks BLOCK_M
    past its last pixel. On a device of ``sms`` multiprocessors (5000: the split cap binds)."""
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    from fused_fpn.kernels.limits import MAX_GRAD_WEIGHT_SPLIT, MAX_PIXELS
    monkeypatch.setattr(L, "interpreting", lambda: False)
    monkeypatch.setattr(L, "_device_facts", lambda device: ("sm90", sms))
    limit = 2**31 - 1
    block_m = {c.kwargs["BLOCK_M"] for table in (K.FWD_CONFIGS, K.EXPERIMENTAL_FWD_CONFIGS, K.NARROW_FWD_CONFIGS)
               for cfgs in table.values() for c in cfgs}
    dw_block_m = {c.kwargs["BLOCK_M"] for table in (K.GRAD_WEIGHT_CONFIGS, K.NARROW_GRAD_WEIGHT_CONFIGS)
                  for cfgs in table.values() for c in cfgs}
    assert max(block_m | dw_block_m) <= 256
    for m in (MAX_PIXELS, MAX_PIXELS - 1, MAX_PIXELS - 255, 2**31 - 2**21 + 77, 3 * 2**29 + 5, 2**30 + 1, 10**9):
        for bm in block_m:
            assert L.cdiv(m, bm) * bm + bm - 1 <= limit, (m, bm)
        for tiles in (1, 2, 3, 8, 64, 1024):
            split, rows = L._grad_weight_split(m, tiles, torch.device("cuda"))
            assert 1 <= split <= MAX_GRAD_WEIGHT_SPLIT and rows % 256 == 0
            assert (split - 1) * rows < m <= split * rows, "every split non-empty, all of [0, M) covered"
            assert split * rows + max(dw_block_m) <= limit, (m, tiles, split, rows)
