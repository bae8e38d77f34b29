"""The C++/CUDA backend ("cuda") on a GPU: parity matrix, backward, opcheck, torch.compile, CUDA graphs.

Skipped as a whole on machines without a CUDA device (every CI machine); on a GPU machine a
CUDA-built ``_C`` is required (test_cuda_backend_available fails otherwise, it does not skip).
Every output is NaN-poisoned before the kernel runs (conftest's autouse fixture), so an element
the kernel forgets to write fails the comparison. The oracle is fused_fpn.reference in float64
on the CPU.
"""
from __future__ import annotations

import pytest
import torch

import fused_fpn
from fused_fpn import _ops
from fused_fpn import backends as fb
from fused_fpn._layout import output_memory_format
from fused_fpn.reference import lateral_grad_bias_top_reference, lateral_reference

from fpn_testing import TOLERANCES, assert_close_to_reference, eager_lateral, make_input, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"
# TF32 (10-bit mantissa) products on unit-scale outputs with fan-in up to ~1k.
TF32_TOL = (1e-2, 1e-2)

# (N, Cin, Cout, H, W, Ht, Wt): odd channel counts (3, 17, 129), up- and down-sampling with
# non-integer ratios, exact 2x, a K loop of many tiles, Cout spanning two 128-wide tiles with a
# tail, H*W not a multiple of 8 (scalar NCHW paths), batch 0. The two deep-K cases with few
# pixels (Cin 1024 / 2048) take the split-K path on every GPU (their tiles fill < half the SMs)
# when the kernel runs them: with a top map, or with strided x (without a top, dense x runs as
# ATen's conv2d, see test_topless_level_route).
SIZES = [
    (2, 2048, 136, 9, 11, 5, 6),
    (2, 3, 17, 7, 9, 4, 5),
    (1, 17, 3, 5, 6, 10, 13),
    (2, 129, 129, 13, 11, 7, 6),
    (1, 256, 256, 16, 16, 8, 8),
    (2, 64, 32, 10, 12, 5, 6),
    (1, 40, 24, 3, 50, 2, 25),
    (1, 1024, 64, 6, 5, 3, 3),
    (2, 32, 136, 20, 17, 10, 9),
    (0, 16, 8, 4, 4, 2, 2),
]
SIZE_IDS = ["x".join(map(str, s)) for s in SIZES]
LAYOUTS = ["nchw", "channels_last", "noncontig", "cl_misaligned"]
DTYPES = [
    pytest.param(torch.float16, False, id="fp16"),
    pytest.param(torch.bfloat16, False, id="bf16"),
    pytest.param(torch.float32, False, id="fp32"),
    pytest.param(torch.float32, True, id="fp32_tf32"),
]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    assert _ops.register(), "fused_fpn._C is not loaded"


@pytest.fixture
def tf32():
    """Sets torch.backends.cudnn.allow_tf32 (what the kernel and eager conv follow) for one test."""
    old = torch.backends.cudnn.allow_tf32

    def set_tf32(on: bool):
        torch.backends.cudnn.allow_tf32 = on

    yield set_tf32
    torch.backends.cudnn.allow_tf32 = old


def _x(shape, dtype, layout, gen):
    """Input in one of LAYOUTS; "cl_misaligned" is a channels_last view whose data pointer and
    strides defeat 16-byte vector loads (channel slice of a wider channels_last tensor)."""
    n, c, h, w = shape
    if layout == "cl_misaligned":
        wide = make_input((n, c + 1, h, w), dtype, DEV, "channels_last", gen)
        t = wide[:, 1:]
        assert t.stride(1) < t.stride(3)
        return t
    if layout == "noncontig" and n * c * h * w == 0:
        # make_input's own check cannot hold for an empty tensor (every empty tensor is "contiguous"):
        # the same strided slice, without it
        wide = torch.randn((n, c + 3, h, 2 * w + 1), generator=gen).to(DEV, dtype)
        return wide[:, 1:c + 1, :, 1::2]
    return make_input(shape, dtype, DEV, layout, gen)


def _case(size, dtype, layout, has_bias, has_top, seed=0, top_layout=None):
    n, cin, cout, h, w, ht, wt = size
    gen = torch.Generator().manual_seed(seed)
    x = _x((n, cin, h, w), dtype, layout, gen)
    weight = (torch.randn((cout, cin), generator=gen) / max(cin, 1) ** 0.5).to(DEV, dtype)
    bias = torch.randn((cout,), generator=gen).to(DEV, dtype) if has_bias else None
    top = None
    if has_top:
        top = _x((n, cout, ht, wt), dtype, top_layout or layout, gen)
    return x, weight, bias, top


def _ref64(x, weight, bias, top):
    d = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    return lateral_reference(d(x), d(weight), d(bias), d(top))


def _check_against_reference(out, x, weight, bias, top, dtype, use_tf32):
    """out vs float64: the TF32 tolerance when TF32 is on, else the dtype's (and for fp16 / bf16 at
    most a bounded factor of eager's error, assert_close_to_reference)."""
    ref = _ref64(x, weight, bias, top)
    if use_tf32:
        assert not torch.isnan(out).any(), "output has NaN: an element was not written"
        torch.testing.assert_close(out.double().cpu(), ref, atol=TF32_TOL[0], rtol=TF32_TOL[1])
    else:
        eager = eager_lateral(x, weight, bias, top) if dtype != torch.float32 else None
        assert_close_to_reference(out.cpu(), ref, dtype, None if eager is None else eager.cpu())


def test_cuda_backend_available():
    assert fb.why_not("cuda", torch.empty(1, 1, 1, 1, device=DEV)) is None
    assert "cuda" in fused_fpn.available_backends(DEV)


@pytest.mark.parametrize("dtype,use_tf32", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("has_bias,has_top", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["bias-top", "bias", "top", "plain"])
def test_lateral_parity(size, layout, dtype, use_tf32, has_bias, has_top, tf32):
    tf32(use_tf32)
    x, weight, bias, top = _case(size, dtype, layout, has_bias, has_top)
    out = fused_fpn.lateral(x, weight, bias, top, backend="cuda")
    assert out.shape == (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    assert out.dtype == dtype and out.device.type == "cuda"
    assert out.is_contiguous(memory_format=output_memory_format(x))
    if out.numel() == 0:
        return
    _check_against_reference(out, x, weight, bias, top, dtype, use_tf32)


@pytest.mark.parametrize("seed", range(24))
def test_lateral_random_shapes(seed, tf32):
    """Seeded random sizes / layouts / dtypes: tails of every tile dimension, vector and scalar paths."""
    tf32(False)
    g = torch.Generator().manual_seed(1000 + seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    mult8 = pick(0, 1) == 1  # channel counts that allow 16-byte vectors, or arbitrary ones
    cin = 8 * pick(1, 40) if mult8 else pick(1, 300)
    cout = 8 * pick(1, 40) if mult8 else pick(1, 300)
    size = (pick(1, 3), cin, cout, pick(1, 40), pick(1, 40), pick(1, 60), pick(1, 60))
    layout = LAYOUTS[pick(0, len(LAYOUTS) - 1)]
    dtype = (torch.float16, torch.bfloat16, torch.float32)[pick(0, 2)]
    has_bias, has_top = pick(0, 1) == 1, pick(0, 1) == 1
    x, weight, bias, top = _case(size, dtype, layout, has_bias, has_top, seed=seed)
    out = fused_fpn.lateral(x, weight, bias, top, backend="cuda")
    assert out.is_contiguous(memory_format=output_memory_format(x))
    eager = eager_lateral(x, weight, bias, top).cpu() if dtype != torch.float32 else None
    assert_close_to_reference(out.cpu(), _ref64(x, weight, bias, top), dtype, eager)


def test_lateral_batch0_shape_and_format():
    x, weight, bias, top = _case((0, 16, 8, 4, 4, 2, 2), torch.float16, "channels_last", True, True)
    out = fused_fpn.lateral(x, weight, bias, top, backend="cuda")
    assert out.shape == (0, 8, 4, 4)


@pytest.mark.parametrize("top_layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_lateral_top_in_other_layouts(layout, top_layout):
    """top is gathered through its own strides, whatever x's layout is."""
    x, weight, bias, top = _case((2, 24, 40, 9, 14, 5, 7), torch.float16, layout, True, True, seed=3,
                                 top_layout=top_layout)
    out = fused_fpn.lateral(x, weight, bias, top, backend="cuda")
    assert_close_to_reference(out.cpu(), _ref64(x, weight, bias, top), torch.float16,
                              eager_lateral(x, weight, bias, top).cpu())


def test_fp32_tf32_switch_selects_the_math(tf32):
    """allow_tf32 off: exact fp32 FMA (fp32 tolerance); on: TF32 tensor cores (results differ)."""
    x, weight, bias, top = _case((2, 512, 64, 12, 12, 6, 6), torch.float32, "channels_last", True, True, seed=5)
    tf32(False)
    exact = fused_fpn.lateral(x, weight, bias, top, backend="cuda")
    tf32(True)
    fast = fused_fpn.lateral(x, weight, bias, top, backend="cuda")
    ref = _ref64(x, weight, bias, top)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(exact.double().cpu(), ref, atol=atol, rtol=rtol)
    assert rel_err(exact.cpu(), ref) < 1e-5
    torch.testing.assert_close(fast.double().cpu(), ref, atol=TF32_TOL[0], rtol=TF32_TOL[1])
    assert not torch.equal(exact, fast), "allow_tf32 on gave the exact fp32 result: TF32 path not taken"


def test_large_level_fp16_channels_last():
    """A ResNet-50-FPN P3-like level (many CTAs, vectorized paths) against float64."""
    x, weight, bias, top = _case((2, 512, 256, 100, 152, 50, 76), torch.float16, "channels_last", True, True, seed=7)
    out = fused_fpn.lateral(x, weight, bias, top, backend="cuda")
    eager = eager_lateral(x, weight, bias, top)
    assert_close_to_reference(out.cpu(), _ref64(x, weight, bias, top), torch.float16, eager.cpu())


def test_split_k_p5_level():
    """A ResNet-50-FPN P5-shaped level (25x38, Cin 2048) with a top map: few output tiles, deep K ->
    split-K, both layouts."""
    for layout in ("channels_last", "nchw"):
        x, weight, bias, top = _case((2, 2048, 256, 25, 38, 13, 19), torch.float16, layout, True, True, seed=8)
        out = fused_fpn.lateral(x, weight, bias, top, backend="cuda")
        assert out.is_contiguous(memory_format=output_memory_format(x))
        eager = eager_lateral(x, weight, bias, top)
        assert_close_to_reference(out.cpu(), _ref64(x, weight, bias, top), torch.float16, eager.cpu())


def _runs_fused_kernel(fn) -> bool:
    """Whether fn() launches the fused forward kernel (torch.profiler's CUDA kernel events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return any("lateral_fwd_kernel" in e.name for e in prof.events())


@pytest.mark.parametrize("dtype,use_tf32", DTYPES)
def test_topless_level_route(dtype, use_tf32, tf32):
    """No top map (P5) and x dense NCHW / channels_last: ATen's conv2d (no fused kernel launch),
    eager's numbers bit for bit. x strided with 16-byte rows (channels_last sliced along W, NCHW
    sliced along C: the kernel's vector paths): the fused kernel, against float64."""
    import torch.nn.functional as F

    tf32(use_tf32)
    for layout in ("channels_last", "nchw"):
        x, weight, bias, _ = _case((2, 2048, 256, 25, 38, 13, 19), dtype, layout, True, False, seed=9)
        out = fused_fpn.lateral(x, weight, bias, None, backend="cuda")
        assert out.is_contiguous(memory_format=output_memory_format(x))
        assert torch.equal(out, F.conv2d(x, weight[:, :, None, None], bias)), layout
        assert not _runs_fused_kernel(lambda: fused_fpn.lateral(x, weight, bias, None, backend="cuda")), layout
    gen = torch.Generator().manual_seed(10)
    strided = {"channels_last": make_input((2, 64, 9, 22), dtype, DEV, "channels_last", gen)[..., ::2],
               "nchw": make_input((2, 128, 8, 10), dtype, DEV, "nchw", gen)[:, ::2]}
    weight, bias = _case((2, 64, 40, 9, 11, 5, 6), dtype, "nchw", True, False, seed=11)[1:3]
    for layout, x in strided.items():
        assert not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)), layout
        out = fused_fpn.lateral(x, weight, bias, None, backend="cuda")
        assert out.is_contiguous(memory_format=output_memory_format(x))
        assert _runs_fused_kernel(lambda: fused_fpn.lateral(x, weight, bias, None, backend="cuda")), layout
        _check_against_reference(out, x, weight, bias, None, dtype, use_tf32)


@pytest.mark.parametrize("size", [(2, 129, 129, 13, 11, 7, 6), (1, 2048, 256, 5, 7, 3, 4)], ids=["one-pass", "split-k"])
def test_lateral_deterministic(size):
    x, weight, bias, top = _case(size, torch.bfloat16, "channels_last", True, True)
    a = fused_fpn.lateral(x, weight, bias, top, backend="cuda")
    b = fused_fpn.lateral(x, weight, bias, top, backend="cuda")
    assert torch.equal(a, b)


def test_lateral_rejects_bad_input():
    x, weight, bias, top = _case((1, 8, 4, 4, 4, 2, 2), torch.float32, "nchw", True, True)
    with pytest.raises(RuntimeError, match="x dtype must be float16, bfloat16 or float32"):
        torch.ops.fused_fpn.lateral(x.double(), weight.double(), bias.double(), top.double())
    with pytest.raises(RuntimeError, match="weight must be on x's device"):
        torch.ops.fused_fpn.lateral(x, weight.cpu(), bias, top)
    with pytest.raises(RuntimeError, match="top must be 4-D"):
        torch.ops.fused_fpn.lateral(x, weight, bias, top[:, :2])
    with pytest.raises(ValueError, match="backend 'cuda' cannot run"):
        fused_fpn.lateral(x.double(), weight.double(), backend="cuda")


# ---- backward -----------------------------------------------------------------------------------

GRAD_SIZES = [  # (N, C, H, W, top_h, top_w); top 0 x 0 = no top
    (2, 17, 7, 9, 4, 5),
    (1, 3, 5, 6, 10, 13),
    (2, 129, 13, 11, 7, 6),
    (2, 64, 16, 16, 8, 8),
    (1, 40, 3, 50, 2, 25),
    (2, 33, 9, 10, 0, 0),
    (0, 8, 4, 4, 2, 2),
    (2, 8, 0, 4, 2, 2),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("size", GRAD_SIZES, ids=["x".join(map(str, s)) for s in GRAD_SIZES])
def test_grad_bias_top_parity(size, layout, dtype):
    n, c, h, w, th, tw = size
    gen = torch.Generator().manual_seed(11)
    dy = _x((n, c, h, w), dtype, layout, gen)
    db, dtop = torch.ops.fused_fpn.lateral_grad_bias_top(dy, th, tw)
    if h == 0 or w == 0:  # nothing to sum (the reference's index rule divides by the empty size)
        rdb, rdtop = torch.zeros(c, dtype=torch.float64), torch.zeros((n, c, th, tw), dtype=torch.float64)
    else:
        rdb, rdtop = lateral_grad_bias_top_reference(dy.double().cpu(), th, tw)
    assert db.shape == (c,) and dtop.shape == (n, c, th, tw)
    assert db.dtype == dtype and dtop.dtype == dtype
    assert dtop.is_contiguous(memory_format=output_memory_format(dy))
    atol, rtol = TOLERANCES[dtype]
    assert not torch.isnan(db).any() and not torch.isnan(dtop).any(), "an element was not written"
    torch.testing.assert_close(db.double().cpu(), rdb, atol=atol, rtol=rtol)
    torch.testing.assert_close(dtop.double().cpu(), rdtop, atol=atol, rtol=rtol)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("size", [(70001, 3, 2, 3, 1, 2), (70001, 3, 2, 3, 0, 0), (1, 70001, 2, 3, 1, 2)],
                         ids=["batch-top", "batch-no-top", "channels-top"])
def test_grad_bias_top_past_the_grid_y_z_limit(size, layout):
    """More than 65535 images or channels: the db + dtop launch once put N (and, for NCHW, C) in the
    grid's y / z (at most 65535) and refused such shapes while the forward accepted them."""
    n, c, h, w, th, tw = size
    dy = _x((n, c, h, w), torch.float32, layout, torch.Generator().manual_seed(5))
    db, dtop = torch.ops.fused_fpn.lateral_grad_bias_top(dy, th, tw)
    rdb, rdtop = lateral_grad_bias_top_reference(dy.double().cpu(), th, tw)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(db.double().cpu(), rdb, atol=atol * 100, rtol=rtol)  # sums of 70001 * 6 terms
    torch.testing.assert_close(dtop.double().cpu(), rdtop, atol=atol, rtol=rtol)


def test_grad_bias_top_deterministic():
    dy = make_input((2, 256, 40, 60), torch.float16, DEV, "channels_last", torch.Generator().manual_seed(1))
    a = torch.ops.fused_fpn.lateral_grad_bias_top(dy, 20, 30)
    b = torch.ops.fused_fpn.lateral_grad_bias_top(dy, 20, 30)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_grad_bias_top_rejects_bad_input():
    dy = torch.randn(1, 4, 4, 4, device=DEV)
    with pytest.raises(RuntimeError, match="top_h and top_w must both be positive"):
        torch.ops.fused_fpn.lateral_grad_bias_top(dy, 2, 0)
    with pytest.raises(RuntimeError, match="grad_out must be 4-D"):
        torch.ops.fused_fpn.lateral_grad_bias_top(dy[0], 2, 2)
    # one of them 0 is a top without pixels, accepted when dy has none either
    db, dtop = torch.ops.fused_fpn.lateral_grad_bias_top(dy[:, :, :0], 0, 3)
    assert dtop.shape == (1, 4, 0, 3) and torch.equal(db, torch.zeros_like(db))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("size", [(2, 17, 24, 7, 9, 4, 5), (1, 32, 16, 6, 6, 9, 11)], ids=["up", "down"])
def test_gradients_fp32_vs_reference(size, layout, tf32):
    """The CUDA kernel has no fp64 (gradcheck's dtype): fp32 gradients against float64 autograd."""
    tf32(False)
    x, weight, bias, top = _case(size, torch.float32, layout, True, True, seed=2)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias, top)]
    out = fused_fpn.lateral(*leaves, backend="cuda")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEV)
    out.backward(grad)
    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in (x, weight, bias, top)]
    lateral_reference(*ref_leaves).backward(grad.double().cpu())
    for name, got, want in zip(("x", "weight", "bias", "top"), leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, atol=1e-3, rtol=1e-3,
                                   msg=lambda m, name=name: f"d{name}: {m}")


# ---- torch.library / compile / graphs -------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_lateral(layout, tf32):
    tf32(False)
    x, weight, bias, top = _case((2, 17, 24, 7, 9, 4, 5), torch.float32, layout, True, True)
    args = tuple(t.requires_grad_(True) for t in (x, weight, bias, top))
    torch.library.opcheck(torch.ops.fused_fpn.lateral.default, args)
    torch.library.opcheck(torch.ops.fused_fpn.lateral.default, (x.detach(), weight.detach(), None, None))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_grad_bias_top(layout):
    dy = make_input((2, 17, 7, 9), torch.float32, DEV, layout, torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.fused_fpn.lateral_grad_bias_top.default, (dy, 4, 5))
    torch.library.opcheck(torch.ops.fused_fpn.lateral_grad_bias_top.default, (dy, 0, 0))


def test_torch_compile_fullgraph():
    x, weight, bias, top = _case((2, 64, 32, 10, 12, 5, 6), torch.float16, "channels_last", True, True)

    def f(x, weight, bias, top):
        return fused_fpn.lateral(x, weight, bias, top, backend="cuda") * 2.0

    eager = f(x, weight, bias, top)
    compiled = torch.compile(f, fullgraph=True)(x, weight, bias, top)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)


def test_cuda_graph_capture_and_replay():
    """Forward and the db/dtop kernel captured into one CUDA graph; replay on new input values."""
    x, weight, bias, top = _case((2, 64, 256, 20, 30, 10, 15), torch.float16, "channels_last", True, True)
    static = [t.clone() for t in (x, weight, bias, top)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (kernel attributes, allocator) outside the capture
        for _ in range(2):
            y = fused_fpn.lateral(*static, backend="cuda")
            torch.ops.fused_fpn.lateral_grad_bias_top(y, 10, 15)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused_fpn.lateral(*static, backend="cuda")
        db, dtop = torch.ops.fused_fpn.lateral_grad_bias_top(y, 10, 15)
    new = _case((2, 64, 256, 20, 30, 10, 15), torch.float16, "channels_last", True, True, seed=9)
    for s, v in zip(static, new):
        s.copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    want_y = fused_fpn.lateral(*new, backend="cuda")
    want_db, want_dtop = torch.ops.fused_fpn.lateral_grad_bias_top(want_y, 10, 15)
    assert torch.equal(y, want_y)
    assert torch.equal(db, want_db) and torch.equal(dtop, want_dtop)


def test_auto_fpn_captured_by_hand_runs_the_warmed_up_backend():
    """The usual recipe (eager warm-up on a side stream, then torch.cuda.graph) with backend="auto":
    the capture runs the backend the warm-up ran ("cuda"; nothing untuned or unloaded inside the
    capture), and the replay matches eager on new inputs. Forward and backward of the whole FPN."""
    from collections import OrderedDict
    torch.manual_seed(0)
    fpn = fused_fpn.FPN([16, 32, 64], 24).to(DEV, torch.float16)
    shapes = [(2, 16, 24, 20), (2, 32, 12, 10), (2, 64, 6, 5)]
    static = OrderedDict((f"c{i}", torch.randn(s, device=DEV, dtype=torch.float16, requires_grad=True))
                         for i, s in enumerate(shapes))
    assert fb.select("auto", static["c0"]).NAME == "cuda"

    def step():
        for t in static.values():
            t.grad = None
        out = fpn(static)
        loss = sum(o.float().square().sum() for o in out.values())
        loss.backward()
        return ([o.detach() for o in out.values()] + [t.grad for t in static.values()]
                + [p.grad for p in fpn.parameters()])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for p in fpn.parameters():
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for t in static.values():
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    captured = [t.clone() for t in captured]   # the eager step below accumulates into the same .grad
    for p in fpn.parameters():
        p.grad = None
    expected = step()
    assert len(captured) == len(expected) == 2 * len(shapes) + len(list(fpn.parameters()))
    for got, want in zip(captured, expected):
        assert torch.equal(got, want)
