"""Helpers shared by the tests: tolerance table, devices and backends, input makers, comparisons."""
from __future__ import annotations

import contextlib
from typing import List, Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_fpn
from fused_fpn import backends as fb

# dtype -> (atol, rtol) for a fused result against the float64 reference, on unit-scale inputs
# with fan-in up to a few hundred. Low precision is additionally bounded by the eager path's
# own error (see assert_close_to_reference).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-4, 2e-4),   # TF32 on GPU is allowed when allow_tf32 is on (tests switch it off)
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (1e-1, 5e-2),
}

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@contextlib.contextmanager
def nan_poisoned():
    """Deterministic algorithms on (warn only) and ``fill_uninitialized_memory``: ATen fills every new
    float tensor (our kernels' outputs included) with NaN, on a GPU as on the CPU, so an element a
    kernel forgets to write is NaN. The previous settings are restored on exit."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = old_fill
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)



class RecordOps(TorchDispatchMode):
    """Records the name of every ATen / custom op that runs (below autograd) while active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

def backends_for(device: str) -> List[str]:
    """Backends the parity matrix runs on ``device``. Triton on CPU tensors (interpreter) is
    excluded here: it is slow, and tests/test_triton_*.py cover it with small shapes."""
    names = fused_fpn.available_backends(device)
    if device == "cpu":
        names = [n for n in names if n != "triton"]
    return names


def backend_device_params(dtypes=None):
    """pytest params (device, backend) for every backend that runs in this process."""
    params = []
    for device in DEVICES:
        for name in backends_for(device):
            params.append(pytest.param(device, name, id=f"{device}-{name}"))
    return params


def backend_supports(name: str, device: str, dtype: torch.dtype) -> Optional[str]:
    probe = torch.empty((1, 1, 1, 1), device=device, dtype=dtype)
    return fb.why_not(name, probe)


def make_input(shape, dtype, device, layout="nchw", generator=None):
    """Random tensor of ``shape`` in a layout: "nchw", "channels_last", or "noncontig" (a strided
    slice of a wider tensor, neither NCHW- nor channels_last-contiguous)."""
    n, c, h, w = shape
    if layout == "noncontig":
        wide = torch.randn((n, c + 3, h, 2 * w + 1), dtype=torch.float32, generator=generator)
        t = wide.to(device=device, dtype=dtype)[:, 1:c + 1, :, 1::2]
        assert t.numel() == 0 or not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last))
        return t
    t = torch.randn(shape, dtype=torch.float32, generator=generator).to(device=device, dtype=dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close_to_reference(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                              eager: Optional[torch.Tensor] = None) -> None:
    """out vs the float64 truth with the dtype's tolerances. With ``eager`` (an unfused computation at
    ``dtype``): first the truth itself is checked against it (assert_reference_matches_eager), then for
    fp16/bf16 also: out is at most ~2x as far from the truth as eager is."""
    if eager is not None:
        assert_reference_matches_eager(ref64, eager, dtype)
    assert not torch.isnan(out).any(), "output has NaN: an element was not written"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref64.double(), atol=atol, rtol=rtol)
    if eager is not None and dtype in (torch.float16, torch.bfloat16):
        ours, theirs = rel_err(out, ref64), rel_err(eager, ref64)
        assert ours <= 2.0 * theirs + 1e-6, f"fused error {ours:.3g} vs eager error {theirs:.3g}"


# eager (computed at the dtype) vs the float64 reference: the dtype's tolerances, float64 tighter
# (the same conv2d and the same gathered values, summed in another order at most)
ORACLE_TOLERANCES = {**TOLERANCES, torch.float64: (1e-12, 1e-12)}


def assert_reference_matches_eager(ref64: torch.Tensor, eager: torch.Tensor, dtype: torch.dtype) -> None:
    """The oracle checked on its own: the float64 reference (fused_fpn.lateral_reference, which is
    also the "torch" backend) against an independent eager result at ``dtype`` (eager_lateral:
    torch's F.conv2d + F.interpolate + add), so a broken reference fails instead of agreeing with
    itself."""
    assert not torch.isnan(eager).any(), "eager result has NaN"
    atol, rtol = ORACLE_TOLERANCES[dtype]
    torch.testing.assert_close(ref64.double(), eager.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"float64 reference vs eager at {dtype}: {m}")


def eager_lateral(x, weight, bias=None, top=None):
    """torchvision's unfused computation in x's dtype: conv1x1, F.interpolate(nearest, size), add.
    (In float64, F.interpolate on CPU picks source pixels in double arithmetic, which departs from the
    float32 rule of the reference for some sizes, e.g. 2 -> 82 or 3 -> 123; not for the sizes the
    parity tests use.)"""
    import torch.nn.functional as F
    w4 = weight if weight.dim() == 4 else weight[:, :, None, None]
    y = F.conv2d(x, w4, bias)
    if top is not None:
        y = y + F.interpolate(top, size=y.shape[-2:], mode="nearest")
    return y


def eager_lateral_any_size(x, weight, bias=None, top=None):
    """eager_lateral, independent of the reference, also where ATen's conv2d does not take the sizes
    (Cin, Cout, H or W == 0: it returns a wrong shape or raises): there the closed form, bias +
    F.interpolate(top) (a sum over no input channels), with every input in the autograd graph (its
    gradients zero where the output does not depend on it)."""
    import torch.nn.functional as F
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    if min(cin, cout, h, w) > 0:
        return eager_lateral(x, weight, bias, top)
    y = x.new_zeros((n, cout, h, w)) + 0 * (x.sum() + weight.sum())
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    if top is not None:
        y = y + (F.interpolate(top, size=(h, w), mode="nearest") if y.numel() else 0 * top.sum())
    return y


def make_lateral_case(n, cin, cout, hw, top_hw, dtype, device, layout, with_bias=True, with_top=True, seed=0):
    """(x, weight [Cout, Cin], bias, top) with unit-scale outputs (weight ~ 1/sqrt(Cin))."""
    g = torch.Generator().manual_seed(seed)
    x = make_input((n, cin, *hw), dtype, device, layout, generator=g)
    weight = (torch.randn((cout, cin), generator=g) / max(cin, 1) ** 0.5).to(device=device, dtype=dtype)
    bias = torch.randn((cout,), generator=g).to(device=device, dtype=dtype) if with_bias else None
    top = make_input((n, cout, *top_hw), dtype, device, layout, generator=g) if with_top else None
    return x, weight, bias, top


def to64(*ts):
    return [None if t is None else t.detach().double() for t in ts]


def gradient_penalty_grads(fn, inputs, weight_out=None):
    """(first, second) of a gradient penalty through ``fn(*inputs)`` (inputs may hold None: absent
    bias / top), both lists over the inputs that are not None:
        first  = d loss / d inputs (create_graph=True),  loss = sum(weight_out * y^2) (weight_out 1 if None)
        second = d (sum_i |first_i|^2) / d inputs
    An input the loss does not depend on gets None in both (all of second is None when no first
    gradient carries a graph, e.g. empty tensors)."""
    used = [t for t in inputs if t is not None]
    y = fn(*inputs)
    loss = (y * y if weight_out is None else weight_out * y * y).sum()
    first = list(torch.autograd.grad(loss, used, create_graph=True, allow_unused=True))
    penalty = sum((f * f).sum() for f in first if f is not None)
    if not (isinstance(penalty, torch.Tensor) and penalty.requires_grad):
        return first, [None] * len(used)
    return first, list(torch.autograd.grad(penalty, used, allow_unused=True))



class SymbolicSizes:
    """Fake tensors whose chosen dims are symbols (what torch.compile's dynamic shapes and
    torch.export with Dims trace), and the check that tracing pinned none of them.

    ``tensor(t, dynamic, other)`` makes the fake copy of t, dims ``dynamic`` symbolic (the strides of
    a view that is not dense too), and notes the sizes and strides of a second case (``other``: a
    tensor of another shape in the same layout). ``assert_none_pinned()``: every replacement the
    trace made (a symbol set to a number, or to an expression of others: top's batch = x's) and
    every guard it recorded hold at the second case's sizes too, i.e. one graph would serve both
    (a guard Eq(s0*s1*s2, 880) from an int() of N*H*W pins the product, a replacement
    H -> 2 * Ht a ratio: both fail there). Pick the second case in the same regime as the first for
    the guards that hold over ranges (conv's batch < 16, the dW split being 1 or not), and with
    other ratios between sizes than the traced one."""

    def __init__(self):
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        self.env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.env)
        self.other_values = {}
        self.traced_values = {}

    def tensor(self, t: torch.Tensor, dynamic=(), other: Optional[torch.Tensor] = None):
        from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext
        dims = [DimDynamic.DYNAMIC if d in dynamic else DimDynamic.STATIC for d in range(t.dim())]
        fake = self.mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))
        traced = (*t.shape, *t.stride())
        for got, value, hint in zip((*fake.shape, *fake.stride()), (*other.shape, *other.stride()) if dynamic else (),
                                    traced):
            if isinstance(got, torch.SymInt) and got.node.expr.is_symbol:
                known = self.other_values.setdefault(got.node.expr, value)
                assert known == value, f"{got.node.expr} stands for {known} and {value} in the second case"
                self.traced_values[got.node.expr] = hint
        return fake

    def assert_none_pinned(self, pinned_ok=()):
        """``pinned_ok``: symbols (``size.node.expr`` of the fake tensors' sizes, read before the trace)
        that the trace may pin; they are read at their traced values, the rest at the second case's."""
        import sympy
        values = {k: sympy.Integer(v) for k, v in self.other_values.items()}
        for symbol in pinned_ok:
            values[symbol] = sympy.Integer(self.traced_values[symbol])
        failing = []
        for symbol, value in self.env.replacements.items():
            held = sympy.Eq(symbol, value).xreplace(values)
            if held is not sympy.true:
                failing.append(f"replacement {symbol} -> {value} (at the other sizes: {held})")
        for guard in self.env.guards:
            held = guard.expr.xreplace(values)
            if held is not sympy.true:
                failing.append(f"guard {guard.expr} (at the other sizes: {held})")
        assert not failing, "what the trace pinned to the traced sizes:\n" + "\n".join(failing)


def only_tma_config(monkeypatch, key, cfg) -> None:
    """Make ``cfg`` the whole forward list of the Triton launches of ``key`` = (arch, kind) that are
    offered the TMA configs: FUSED_FPN_TRITON_EXPERIMENTAL=1, the default and experimental lists of
    ``key`` empty, and TMA_FWD_CONFIGS[key] = [cfg] (a launch that is not offered them then has no
    config at all)."""
    from fused_fpn.kernels import lateral_kernels as K
    monkeypatch.setenv(K.EXPERIMENTAL_ENV, "1")
    monkeypatch.setitem(K.FWD_CONFIGS, key, [])
    monkeypatch.setitem(K.EXPERIMENTAL_FWD_CONFIGS, key, [])
    monkeypatch.setitem(K.TMA_FWD_CONFIGS, key, [cfg])
