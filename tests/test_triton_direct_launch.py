"""The triton backend's direct launches: a plain eager call runs the registered op's body without the
dispatcher (``fused_fpn.backends.triton.direct_launch_allowed``), and gets the op's numbers bit for
bit; every call that must see the op (autograd, dispatch and torch_function modes, TorchScript
tracing, the profiler, functorch transforms, tensor subclasses, torch.compile) still gets it.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (conftest.py); with a GPU
the same tests run on CUDA tensors with compiled kernels.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fused_fpn
from fused_fpn import backends as fb
from fused_fpn.kernels.limits import MAX_PIXELS

from fpn_testing import HAS_CUDA, RecordOps, make_lateral_case

_REASON = fb.unavailable_reason("triton")
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=f"triton backend unavailable: {_REASON}"),
              pytest.mark.usefixtures("no_tf32")]   # IEEE fp32 on GPUs (conftest)
if HAS_CUDA:
    pytestmark.append(pytest.mark.gpu)

DEVICE = "cuda" if HAS_CUDA else "cpu"
OP = "fused_fpn.triton_lateral.default"


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of the registered ops (torch.ops.fused_fpn.triton_lateral[_backward]) that the
    backend makes, by name; the ops themselves still run. (Not under a torch_function mode, which
    looks the op up by name again: the spy would count it twice.)"""
    from fused_fpn.backends import triton as tb
    tb.ops()   # registered
    calls = {"forward": 0, "backward": 0}
    for name, what in (("triton_lateral", "forward"), ("triton_lateral_backward", "backward")):
        op = getattr(torch.ops.fused_fpn, name)

        def spy(*args, _op=op, _what=what):
            calls[_what] += 1
            return _op(*args)
        monkeypatch.setattr(torch.ops.fused_fpn, name, spy)
    return calls


def _case(layout, dtype=torch.float32, with_bias=True, with_top=True, seed=0):
    # odd sizes, 2x-ish upsampling with a non-integer ratio, a reduction that is no tile multiple
    return make_lateral_case(2, 17, 33, (7, 9), (4, 5), dtype, DEVICE, layout, with_bias, with_top, seed)


class _PassThroughFunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("with_bias,with_top", [(True, True), (False, True), (True, False)])
def test_plain_eager_call_launches_directly_with_the_ops_numbers(op_calls, layout, dtype, with_bias, with_top):
    """No grad, no mode, plain tensors: the op is not dispatched, and the output is the registered
    op's bit for bit (same launcher, same kernels) in x's memory format."""
    x, w, b, top = _case(layout, dtype, with_bias, with_top)
    direct = fused_fpn.lateral(x, w, b, top, backend="triton")
    assert op_calls["forward"] == 0
    via_op = torch.ops.fused_fpn.triton_lateral(x, w, b, top)
    assert op_calls["forward"] == 1
    assert not direct.isnan().any()
    assert torch.equal(direct, via_op)
    assert direct.stride() == via_op.stride()


def test_grad_mode_off_and_inference_mode_launch_directly(op_calls):
    x, w, b, top = _case("channels_last")
    x.requires_grad_()
    with torch.no_grad():
        a = fused_fpn.lateral(x, w, b, top, backend="triton")
    with torch.inference_mode():
        c = fused_fpn.lateral(x.detach(), w, b, top, backend="triton")
    assert op_calls["forward"] == 0
    assert a.grad_fn is None and not a.requires_grad and c.is_inference()
    assert torch.equal(a, c)


def _op_path_only(monkeypatch):
    """Every later call of the backend takes the registered ops, as a call that must show them does."""
    from fused_fpn.backends import triton as tb
    monkeypatch.setattr(tb, "direct_launch_allowed", lambda *tensors: False)


def test_fpn_forward_without_grad_launches_every_level_directly(op_calls, monkeypatch):
    """The module's levels go through the backend's entry point: one direct launch each, and the
    module's output is the op path's."""
    from torchvision.ops import FeaturePyramidNetwork
    torch.manual_seed(0)
    tv = FeaturePyramidNetwork([8, 16, 24], 12).to(DEVICE).eval()
    ours = fused_fpn.FPN.from_torchvision(copy.deepcopy(tv), backend="triton")
    feats = OrderedDict((f"c{i}", torch.randn(2, c, 9 >> i, 11 >> i, device=DEVICE))
                        for i, c in enumerate([8, 16, 24]))
    with torch.no_grad():
        direct = ours(feats)
        assert op_calls["forward"] == 0
        _op_path_only(monkeypatch)
        via_op = ours(feats)
    assert op_calls["forward"] == 3
    for k in direct:
        assert torch.equal(direct[k], via_op[k]), k


def test_backward_launches_directly_with_the_ops_gradients(op_calls, monkeypatch):
    """An input requiring grad records the op (autograd needs its node); its backward, in a plain
    eager call, runs the backward op's body directly, with the backward op's gradients bit for bit."""
    x, w, b, top = _case("nchw")
    leaves = [t.clone().requires_grad_() for t in (x, w, b, top)]
    y = fused_fpn.lateral(*leaves, backend="triton")
    assert op_calls["forward"] == 1 and y.grad_fn is not None
    g = torch.randn_like(y)
    direct = torch.autograd.grad(y, leaves, g, retain_graph=True)
    assert op_calls["backward"] == 0
    _op_path_only(monkeypatch)
    via_op = torch.autograd.grad(y, leaves, g)
    assert op_calls["backward"] == 1
    for a, c in zip(direct, via_op):
        assert not a.isnan().any()
        assert torch.equal(a, c)


def test_a_dispatch_mode_sees_the_op():
    """A torch_dispatch mode (FlopCounterMode, a user's logging mode, a trace) is shown the op, not
    the launcher's allocations."""
    x, w, b, top = _case("nchw")
    mode = RecordOps()
    with mode:
        y = fused_fpn.lateral(x, w, b, top, backend="triton")
    assert OP in mode.ops, mode.ops
    assert torch.equal(y, fused_fpn.lateral(x, w, b, top, backend="triton"))


def test_torchscript_trace_records_the_op():
    """torch.jit.trace (and the TorchScript-based ONNX export) records what the dispatcher sees: a
    direct launch would leave the op out of the trace, which would then not compute it."""
    x, w, b, top = _case("nchw")
    traced = torch.jit.trace(lambda x, top: fused_fpn.lateral(x, w, b, top, backend="triton"), (x, top),
                             check_trace=False)
    assert "fused_fpn::triton_lateral" in str(traced.graph)
    x2, _, _, top2 = _case("nchw", seed=1)
    assert torch.equal(traced(x2, top2), fused_fpn.lateral(x2, w, b, top2, backend="triton"))


def test_profiler_shows_the_op():
    x, w, b, top = _case("nchw")
    with torch.profiler.profile() as prof:
        fused_fpn.lateral(x, w, b, top, backend="triton")
    assert any("fused_fpn::triton_lateral" in e.name for e in prof.events())


def test_calls_that_must_see_the_op_are_not_direct():
    """``direct_launch_allowed`` in each case where something other than the dispatcher must see the
    op, and in a plain call."""
    from fused_fpn.backends import triton as tb
    x, w, b, top = _case("nchw")
    allowed = tb.direct_launch_allowed
    assert allowed(x, w, b, top) and allowed(x, w, None, None)
    assert not allowed(x.clone().requires_grad_(), w, b, top)
    assert not allowed(x, torch.nn.Parameter(w), b, top)   # a Parameter requires grad ...
    with torch.no_grad():
        assert allowed(x, torch.nn.Parameter(w), b, top)   # ... which no_grad does not record
    with RecordOps():
        assert not allowed(x, w, b, top)
    with _PassThroughFunctionMode():
        assert not allowed(x, w, b, top)
    with torch.device(DEVICE):   # a torch_function mode too
        assert not allowed(x, w, b, top)
    with torch.profiler.profile():
        assert not allowed(x, w, b, top)
    assert torch.vmap(lambda t: torch.tensor(allowed(t, w, b, top)))(x[:, None]).tolist() == [False, False]

    class Sub(torch.Tensor):
        pass
    assert not allowed(x.as_subclass(Sub), w, b, top)
    seen = []

    def body(x):
        seen.append(allowed(x, w, b, top))
        return x + 1
    torch.compile(body, backend="eager", fullgraph=True)(x)
    assert seen == [False]   # traced once by dynamo, which runs the op path


def test_direct_launch_checks_the_pixel_limit():
    """The one check of the op's body that fused_fpn.lateral does not make itself: N*H*W within the
    kernels' 32-bit pixel indices (an expanded x of MAX_PIXELS + 1 pixels, one element of memory)."""
    one = torch.ones((1, 1, 1, 1), device=DEVICE)
    w = torch.ones((1, 1), device=DEVICE)
    with pytest.raises(ValueError, match="pixels"):
        fused_fpn.lateral(one.expand(1, 1, MAX_PIXELS + 1, 1), w, backend="triton")


def _negative_bit(t):
    """t's values in a tensor with the negative bit set (-(-t) through .conj().imag), as public ops
    make them: the memory holds -t."""
    z = torch.complex(torch.zeros_like(t, dtype=torch.float32), -t.float()).conj()
    neg = z.imag.to(t.dtype) if t.dtype != torch.float32 else z.imag
    assert neg.is_neg() and torch.equal(neg.resolve_neg(), t)
    return neg


def test_negative_bit_inputs_take_the_op_which_resolves_them():
    """A tensor with the negative bit reads as the negation of its memory; the dispatcher resolves the
    bit before the op's body runs, the kernels would not: such calls take the op, forward and
    backward, and give the resolved tensors' numbers."""
    from fused_fpn.backends import triton as tb
    x, w, b, top = _case("nchw")
    xn, wn = _negative_bit(x), _negative_bit(w)
    assert not tb.direct_launch_allowed(xn, w, b, top) and not tb.direct_launch_allowed(x, wn, b, top)
    expected = fused_fpn.lateral(x, w, b, top, backend="triton")
    assert torch.equal(fused_fpn.lateral(xn, w, b, top, backend="triton"), expected)
    assert torch.equal(fused_fpn.lateral(x, wn, b, top, backend="triton"), expected)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, top)]
    y = fused_fpn.lateral(*leaves, backend="triton")
    g = torch.randn_like(y)
    expected_grads = torch.autograd.grad(y, leaves, g, retain_graph=True)
    for got, want in zip(torch.autograd.grad(y, leaves, _negative_bit(g)), expected_grads):
        assert torch.equal(got, want)


def test_fpn_with_a_weight_that_does_not_fit_raises_on_the_direct_lane():
    """The module passes its levels to the backend unchecked against x (a swapped weight leaves the
    conv's in_channels stale); the direct lane runs the op body's checks, as the op does: a
    ValueError, not a read past x's channels."""
    from torchvision.ops import FeaturePyramidNetwork
    torch.manual_seed(0)
    tv = FeaturePyramidNetwork([8, 16], 12).to(DEVICE).eval()
    tv.inner_blocks[0][0].weight = torch.nn.Parameter(torch.randn(12, 5, 1, 1, device=DEVICE))
    ours = fused_fpn.FPN.from_torchvision(tv, backend="triton")
    feats = OrderedDict(c0=torch.randn(1, 8, 6, 6, device=DEVICE), c1=torch.randn(1, 16, 3, 3, device=DEVICE))
    with torch.no_grad(), pytest.raises(ValueError, match="weight"):
        ours(feats)


def test_functionalization_takes_the_op():
    """Under functionalization (torch.func.functionalize's C++ layer) the inputs are functional
    wrappers of type torch.Tensor, whose storage the kernels cannot read: the op path."""
    from fused_fpn.backends import triton as tb
    x, w, b, top = _case("nchw")
    torch._enable_functionalization(reapply_views=True)
    try:
        xf = torch._to_functional_tensor(x)
        assert not tb.direct_launch_allowed(xf, w, b, top)
        y = torch._from_functional_tensor(fused_fpn.lateral(xf, w, b, top, backend="triton"))
    finally:
        torch._disable_functionalization()
    assert torch.equal(y, fused_fpn.lateral(x, w, b, top, backend="triton"))


def test_direct_bodies_launch_the_kernels_without_asking_wrap_triton(monkeypatch):
    """Inside ``run_directly`` (the lane) a launch takes the kernel itself; outside it asks
    ``wrap_triton`` (which records the launch while torch.compile traces the op), and the thread's
    flag is restored when the body raises."""
    from fused_fpn.kernels import lateral_launch as L
    kernel, wrapped = object(), object()
    monkeypatch.setattr(torch.library, "wrap_triton", lambda k: wrapped)
    assert L._launcher(kernel) is wrapped
    assert L.run_directly(L._launcher, kernel) is kernel
    assert L.run_directly(lambda: L.run_directly(L._launcher, kernel)) is kernel   # nested

    def fails():
        raise KeyError("body")
    with pytest.raises(KeyError):
        L.run_directly(fails)
    assert L._launcher(kernel) is wrapped
