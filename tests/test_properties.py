"""Property tests (hypothesis) of ``fused_fpn.lateral``: every backend that runs here against the
float64 reference, forward and backward, over drawn shapes, dtypes, layouts and bias/top presence;
and bit-for-bit determinism run to run.

Profiles (hypothesis settings, applied to the tests of this file):
    "ci"    (default) derandomized (a fixed seed: the same examples every run), 100 examples per
            property and backend (fewer for the Triton interpreter, and for compiled Triton on a GPU:
            COMPILED_TRITON_FRACTION), no deadline: the whole file
            runs in about 10 s on 2 CPU cores.
    "long"  10x the examples and a fresh random seed each run (a few minutes). Select it with
            ``FUSED_FPN_HYPOTHESIS_PROFILE=long pytest tests/test_properties.py``.
A failing example is printed with ``@reproduce_failure`` (print_blob) so it can be replayed.

What is drawn: N 1..3 (batch 0 has its own tests in test_edge_cases.py), Cin and Cout 1..40, H and W
1..17, the top's Ht and Wt 1..20 (so smaller than, equal to and larger than x: nearest up- and
down-sampling), x's and top's layout (nchw, channels_last,
noncontig), the weight's form ([Cout, Cin], [Cout, Cin, 1, 1], or a transposed view), bias and top
present or absent, and the dtype among those the backend takes on that device (float64 / float32 /
float16 / bfloat16 on the CPU backends; under the Triton interpreter only float32 / float16 and tiny
sizes, because the interpreter is slow and computes bfloat16 wrongly; on a GPU float32 / float16 /
bfloat16 for "cuda" and "triton").

How close: the output at the per-dtype tolerances of fpn_testing.TOLERANCES; a gradient at those
tolerances scaled by its largest element. Every result that a backend computes itself as an fp32
sum rounded once (rounded_once: all of Triton's, the CUDA kernels', the CPU's db and dtop) is held to
an elementwise bound instead, twice the classical one for that sum (_assert_rounded_once), which
fails a sum rounded in the dtype along the way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis import given

import fused_fpn
from fused_fpn._layout import output_memory_format
from fpn_testing import DEVICES, TOLERANCES, assert_reference_matches_eager, backend_supports, eager_lateral

# ---- hypothesis profiles ---------------------------------------------------------------------------

PROFILE_ENV = "FUSED_FPN_HYPOTHESIS_PROFILE"
_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    # nan_poison (conftest) is function-scoped: it only switches global flags, so running it once per
    # test (not per example) is what we want. Tensor building is not hypothesis' own slowness.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=100, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=1000, derandomize=False, **_COMMON)
PROFILE = settings.get_profile(os.environ.get(PROFILE_ENV, "ci"))


def _examples(fraction: float) -> settings:
    """The selected profile with a fraction of its examples (for the slower backends)."""
    return settings(PROFILE, max_examples=max(3, int(PROFILE.max_examples * fraction)))


# Compiled Triton (a GPU) takes this fraction of a property's examples: each drawn shape compiles the
# kernels again for its own specialization (sizes and strides of 1 or divisible by 16, dtype, layout,
# bias / top), which made the reference property's 100 examples take 114 s on an H200 (2026-12-04,
# with 11 other test workers compiling too), past the GPU run's 100 s per test. The kernels' configs
# are each checked alone at odd sizes in tests/test_triton_gpu.py.
COMPILED_TRITON_FRACTION = 0.3


def _run_property(check, device: str, backend: str, fraction: float) -> None:
    """``check(device, backend, data)`` over drawn examples: ``fraction`` of the profile's, times
    COMPILED_TRITON_FRACTION for the Triton backend on a GPU."""
    if backend == "triton" and device != "cpu":
        fraction *= COMPILED_TRITON_FRACTION

    @given(data=st.data())
    @_examples(fraction)
    def run(data):
        check(device, backend, data)
    run()


# ---- which backends, devices and dtypes -----------------------------------------------------------

ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _is_interp(device: str, backend: str) -> bool:
    return device == "cpu" and backend == "triton"


def backend_params(interpreter: bool):
    """(device, backend) for every backend that runs on every device here. On the CPU the Triton
    backend runs only under the interpreter: ``interpreter=True`` gives that one (tiny sizes, few
    examples), ``False`` every other."""
    params = []
    for device in DEVICES:
        for name in fused_fpn.available_backends(device):
            if _is_interp(device, name) == interpreter:
                params.append(pytest.param(device, name, id=f"{device}-{name}" + ("-interp" if interpreter else "")))
    return params


def dtypes_for(backend: str, device: str):
    return [d for d in ALL_DTYPES if backend_supports(backend, device, d) is None]


pytestmark = pytest.mark.usefixtures("no_tf32")   # IEEE fp32 on GPUs (conftest)


# ---- the drawn case ---------------------------------------------------------------------------------

LAYOUTS = ("nchw", "channels_last", "noncontig")
WEIGHT_FORMS = ("2d", "4d", "transposed")


def make_input(shape, dtype, device, layout, generator):
    """A random tensor in a layout: "nchw", "channels_last" or "noncontig" (a strided slice of a wider
    tensor, as fpn_testing.make_input makes it, without its assertion: for drawn sizes of 1 the
    slice can be contiguous after all)."""
    n, c, h, w = shape
    if layout == "noncontig":
        wide = torch.randn((n, c + 3, h, 2 * w + 1), generator=generator)
        return wide.to(device=device, dtype=dtype)[:, 1:c + 1, :, 1::2]
    t = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    n: int
    cin: int
    cout: int
    hw: Tuple[int, int]
    top_hw: Optional[Tuple[int, int]]     # None: no top
    with_bias: bool
    x_layout: str
    top_layout: str
    weight_form: str
    seed: int

    def tensors(self, device):
        """(x, weight, bias, top): unit-scale outputs (weight ~ 1/sqrt(Cin)), weight in its drawn form."""
        g = torch.Generator().manual_seed(self.seed)
        x = make_input((self.n, self.cin, *self.hw), self.dtype, device, self.x_layout, generator=g)
        w = torch.randn((self.cout, self.cin), generator=g) / self.cin ** 0.5
        if self.weight_form == "4d":
            w = w[:, :, None, None]
        elif self.weight_form == "transposed":     # a [Cout, Cin] view with strides (1, Cout)
            w = w.t().contiguous().t()
        w = w.to(device=device, dtype=self.dtype)
        b = torch.randn((self.cout,), generator=g).to(device=device, dtype=self.dtype) if self.with_bias else None
        top = None
        if self.top_hw is not None:
            top = make_input((self.n, self.cout, *self.top_hw), self.dtype, device, self.top_layout, generator=g)
        return x, w, b, top


@st.composite
def cases(draw, dtypes, max_n=3, max_c=40, max_hw=17, max_top=20):
    dtype = draw(st.sampled_from(dtypes))
    n = draw(st.integers(1, max_n))   # batch 0: its own tests (test_edge_cases.py)
    cin, cout = draw(st.integers(1, max_c)), draw(st.integers(1, max_c))
    hw = (draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw)))
    top_hw = (draw(st.integers(1, max_top)), draw(st.integers(1, max_top))) if draw(st.booleans()) else None
    return Case(dtype=dtype, n=n, cin=cin, cout=cout, hw=hw, top_hw=top_hw, with_bias=draw(st.booleans()),
                x_layout=draw(st.sampled_from(LAYOUTS)), top_layout=draw(st.sampled_from(LAYOUTS)),
                weight_form=draw(st.sampled_from(WEIGHT_FORMS)), seed=draw(st.integers(0, 2**31 - 1)))


def _draw_case(data, device, backend):
    if _is_interp(device, backend):   # the interpreter: fp32/fp16, tiny sizes
        strategy = cases([d for d in dtypes_for(backend, device) if d in (torch.float32, torch.float16)],
                         max_n=2, max_c=20, max_hw=9, max_top=10)
    else:
        strategy = cases(dtypes_for(backend, device))
    case = data.draw(strategy, label="case")
    event(f"dtype {case.dtype}")     # shown by --hypothesis-show-statistics
    event(f"top {'none' if case.top_hw is None else 'larger' if case.top_hw[0] > case.hw[0] else 'not larger'}")
    return case


# ---- comparisons ------------------------------------------------------------------------------------

def _assert_grad_close(name, got, ref, dtype):
    """A gradient against its float64 truth, at the table's tolerance. dW and db sum over up to N*H*W
    pixels and dtop over each top pixel's preimage, so the absolute tolerance is the table's atol times
    the gradient's scale (its largest element). For results a backend rounds once from an fp32
    accumulator, _assert_rounded_once bounds every element far more tightly."""
    _assert_shape_dtype_written(name, got, ref, dtype)
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(got.double(), ref, atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"grad of {name}: {m}")


def _assert_shape_dtype_written(name, got, ref, dtype):
    assert got is not None, f"grad of {name} is missing"
    assert got.shape == ref.shape, f"grad of {name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == dtype, f"grad of {name}: dtype {got.dtype} != {dtype}"
    assert not torch.isnan(got).any(), f"grad of {name} has NaN: an element was not written"


# Unit roundoff u (half an ulp of 1.0) of each dtype; the accumulator's is float32's, float64's for float64.
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}


def rounded_once(backend: str, device: str, case: "Case") -> frozenset:
    """The results ("out" and the gradients' names) that ``backend`` computes itself as an fp32 sum
    (float64 for float64) rounded once to the dtype, what the fused kernels promise (issues #3, #4):
    - triton (compiled or interpreted): all five; on a GPU with TF32 off (the no_tf32 fixture);
    - cuda: db + dtop (its own kernel), dW (a cuBLAS GEMM with an fp32 output, the out_dtype mm /
      bmm of fused_fpn::conv1x1_backward), dx in float32 only (a plain mm / bmm: for fp16 / bf16
      cuBLAS may reduce split-K partial sums in the dtype, torch's default
      allow_fp16/bf16_reduced_precision_reduction), and the output when a top map is present (a level
      without one and with x dense is cuDNN's conv2d, with ATen's bias add after it);
    - cpu: db and dtop (the C++ pass over dy); dx, dW and the output are ATen's oneDNN convolution
      and eager's roundings (its fp16 / bf16 dW rounds partial sums in the dtype);
    - torch: none, all of it is ATen's (eager's own roundings)."""
    if backend == "triton":
        return frozenset({"out", *GRAD_NAMES})
    if backend == "cuda" and device != "cpu":
        return (frozenset({"weight", "bias", "top"}) | ({"x"} if case.dtype == torch.float32 else frozenset())
                | ({"out"} if case.top_hw is not None else frozenset()))
    if backend == "cpu" and device == "cpu":
        return frozenset({"bias", "top"})
    return frozenset()


def _assert_rounded_once(name, got, ref, ref_abs, dtype, terms: int):
    """Every element of a sum of ``terms`` products, accumulated in fp32 (float64) and rounded once to
    ``dtype``, within twice the classical bound of its float64 truth:
        |got - ref| <= 2 * (u(dtype) * |ref| + terms * u(acc) * ref_abs) + tiny(dtype),
    ref_abs being the sum of the products' absolute values (the float64 reference run on |inputs|,
    backward with |dy|). Unlike _assert_grad_close's tolerance, which scales with the largest element,
    this fails a sum rounded in the dtype along the way (measured: up to 225x this bound for the CPU's
    fp16 / bf16 dW, which is ATen's oneDNN) and, in fp32 / float64, a missing or extra term."""
    _assert_shape_dtype_written(name, got, ref, dtype)
    u_acc = UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    bound = 2 * (UNIT_ROUNDOFF[dtype] * ref.abs() + terms * u_acc * ref_abs) + torch.finfo(dtype).tiny
    excess = (got.double() - ref).abs() - bound
    if excess.numel() and excess.max().item() > 0:
        i = int(excess.argmax())
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())} of {excess.numel()} elements are not rounded once from an fp32 "
            f"sum of {terms} terms; worst at flat index {i}: got {got.reshape(-1)[i].item()!r}, float64 "
            f"{ref.reshape(-1)[i].item()!r}, bound {bound.reshape(-1)[i].item():.3g} (sum of |terms| "
            f"{ref_abs.reshape(-1)[i].item():.3g})")


def _forward_backward(case: Case, device: str, backend: str):
    """(leaves, out, dy): lateral on fresh leaves that require grad, then out.backward(dy)."""
    x, w, b, top = case.tensors(device)
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, w, b, top)]
    out = fused_fpn.lateral(*leaves, backend=backend)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 1)).to(device, case.dtype)
    out.backward(dy)
    return leaves, out, dy


# ---- property 1: forward and backward against the float64 reference --------------------------------

def _check_against_reference(device, backend, data):
    case = _draw_case(data, device, backend)
    leaves, out, dy = _forward_backward(case, device, backend)
    x = leaves[0]

    assert out.shape == (case.n, case.cout, *case.hw) and out.dtype == case.dtype and out.device == x.device
    if out.numel():
        assert out.is_contiguous(memory_format=output_memory_format(x)), "output not in x's memory format"
    refs = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    ref = fused_fpn.lateral_reference(*refs)
    # the reference against eager torchvision's computation (so the "torch" backend in float64, which
    # is the reference, is not compared with itself alone): conv2d, then F.interpolate's nearest + add
    eager = eager_lateral(*(None if t is None else t.detach() for t in refs))
    assert_reference_matches_eager(ref.detach(), eager, torch.float64)
    assert not torch.isnan(out).any(), "output has NaN: an element was not written"
    atol, rtol = TOLERANCES[case.dtype]
    torch.testing.assert_close(out.detach().double(), ref.detach(), atol=atol, rtol=rtol)
    ref.backward(dy.double())

    # each result's sum of |terms|: the reference on |inputs|, its backward with |dy|
    absolutes = [None if t is None else t.detach().double().abs().requires_grad_() for t in leaves]
    ref_abs = fused_fpn.lateral_reference(*absolutes)
    ref_abs.backward(dy.double().abs())
    pixels = case.n * case.hw[0] * case.hw[1]
    terms = {"out": case.cin + 2, "x": case.cout, "weight": pixels, "bias": pixels, "top": pixels}
    once = rounded_once(backend, device, case)
    if "out" in once:
        _assert_rounded_once("output", out.detach(), ref.detach(), ref_abs.detach(), case.dtype, terms["out"])
    for name, got, r, a in zip(GRAD_NAMES, leaves, refs, absolutes):
        if got is None:
            continue
        if name in once:
            _assert_rounded_once(f"grad of {name}", got.grad, r.grad, a.grad, case.dtype, terms[name])
        else:
            _assert_grad_close(name, got.grad, r.grad, case.dtype)


@pytest.mark.parametrize("device,backend", backend_params(interpreter=False))
def test_forward_and_backward_match_float64_reference(device, backend):
    _run_property(_check_against_reference, device, backend, 1.0)


@pytest.mark.parametrize("device,backend", backend_params(interpreter=True))
@given(data=st.data())
@_examples(0.15)
def test_forward_and_backward_match_float64_reference_interpreted(device, backend, data):
    _check_against_reference(device, backend, data)


# ---- property 2: bit-for-bit determinism run to run --------------------------------------------------

GRAD_NAMES = ("x", "weight", "bias", "top")


def _own_grads(device: str, backend: str):
    """The gradients a backend must reproduce bit for bit with deterministic mode off.
    CPU: all four (the C++ db/dtop pass and ATen's CPU convolution backward are deterministic).
    CUDA: the Triton backend computes all four itself without atomics; the "cuda" backend computes
    db and dtop itself and dx, dW as cuBLAS GEMMs (``fused_fpn::conv1x1_backward``, csrc/autograd.cpp: not cuDNN's
    convolution backward, whose default algorithms may use atomics); the "torch" reference is all
    ATen (cuDNN) and is not claimed."""
    if device == "cpu":
        return GRAD_NAMES
    return {"triton": GRAD_NAMES, "cuda": GRAD_NAMES}.get(backend, ())


def _check_deterministic(device, backend, data):
    """Same inputs -> bit-identical forward output and gradients, with torch's deterministic mode
    OFF (the default a user runs with); a call on other shapes between the two runs changes the
    allocator's and the caches' state."""
    torch.use_deterministic_algorithms(False)   # "by default"; conftest's fixture restores the flags
    case = _draw_case(data, device, backend)
    other = _draw_case(data, device, backend)
    runs = []
    for i in range(2):
        leaves, out, _ = _forward_backward(case, device, backend)
        runs.append((out.detach(), {name: (None if t is None else t.grad) for name, t in zip(GRAD_NAMES, leaves)}))
        if i == 0:
            _forward_backward(other, device, backend)
    (out0, grads0), (out1, grads1) = runs
    assert torch.equal(out0, out1), "forward output differs between two identical calls"
    for name in _own_grads(device, backend):
        a, b = grads0[name], grads1[name]
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b), f"grad of {name} differs between two identical backward passes"


@pytest.mark.parametrize("device,backend", backend_params(interpreter=False))
def test_bitwise_deterministic_run_to_run(device, backend):
    _run_property(_check_deterministic, device, backend, 0.5)


@pytest.mark.parametrize("device,backend", backend_params(interpreter=True))
@given(data=st.data())
@_examples(0.1)
def test_bitwise_deterministic_run_to_run_interpreted(device, backend, data):
    _check_deterministic(device, backend, data)


# ---- property 3: forward-mode AD (the output's tangent) against the float64 reference's jvp ---------

def _check_forward_mode(device, backend, data):
    import torch.autograd.forward_ad as fwAD
    case = _draw_case(data, device, backend)
    primals = case.tensors(device)
    tangents = Case(**{**case.__dict__, "seed": case.seed + 2}).tensors(device)   # same shapes and layouts
    with fwAD.dual_level():
        duals = [None if p is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        out, tangent = fwAD.unpack_dual(fused_fpn.lateral(*duals, backend=backend))
    present = [i for i, p in enumerate(primals) if p is not None]

    def ref_fn(*args):
        full = [None] * 4
        for i, a in zip(present, args):
            full[i] = a
        return fused_fpn.lateral_reference(*full)

    _, ref_tangent = torch.func.jvp(ref_fn, tuple(primals[i].double() for i in present),
                                    tuple(tangents[i].double() for i in present))
    _assert_grad_close("output (its tangent)", tangent, ref_tangent, case.dtype)


@pytest.mark.parametrize("device,backend", backend_params(interpreter=False))
def test_forward_mode_tangent_matches_float64_reference(device, backend):
    _run_property(_check_forward_mode, device, backend, 0.3)


def test_compiled_triton_draws_its_fraction_of_the_examples():
    """_run_property's example counts (a stub check, no kernel runs): the profile's fraction for every
    backend, times COMPILED_TRITON_FRACTION for Triton off the CPU (where each shape compiles)."""
    counts = {}

    def count(device, backend, data):
        data.draw(st.integers(0, 10 ** 6))
        counts[(device, backend)] = counts.get((device, backend), 0) + 1
    for device, backend in (("cpu", "cpu"), ("cuda", "cuda"), ("cuda", "triton")):
        _run_property(count, device, backend, 0.5)
    full = max(3, int(PROFILE.max_examples * 0.5))
    reduced = max(3, int(PROFILE.max_examples * 0.5 * COMPILED_TRITON_FRACTION))
    assert counts == {("cpu", "cpu"): full, ("cuda", "cuda"): full, ("cuda", "triton"): reduced}
    assert reduced < full
