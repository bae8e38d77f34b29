"""Issue 7's edge cases and bad input for the CUDA backend, on machines without a GPU.

The CUDA kernels and the real host code of csrc/cuda/lateral_cuda.cpp run on CPU tensors through
the emulation of csrc/cuda/emu (fixture ``cuda_emu``, conftest.py): the forward op
(``fused_fpn::lateral``'s CUDA implementation) and the fused db + dtop pass of its backward
(``fused_fpn::lateral_grad_bias_top``). dx and dW are not kernels of ours: ATen's
convolution_backward on CPU tensors (exercised by test_edge_cases.py through the ``cpu`` backend)
and ATen GEMMs on CUDA tensors (``conv1x1_backward_gemm`` in csrc/autograd.cpp).

Covered here, against the float64 reference: 1x1 / 1xW / Hx1 maps with up- and down-sampled tops,
channel counts off every tile size (3, 17, 129), stride-0 (expanded) inputs, NaN / Inf reaching
exactly the reference's positions, element offsets past 2^31 (views into one 4 GiB storage), empty
batch / map / channel sizes, a db + dtop launch past the grid's size, and bad input: a RuntimeError naming the argument, inputs unchanged.
On a GPU the same cases run on the real kernels in test_edge_cases.py and test_properties.py.
"""
from __future__ import annotations

import pytest
import torch

from fused_fpn import nearest_source_indices
from fused_fpn._layout import output_memory_format
from fused_fpn.reference import lateral_grad_bias_top_reference, lateral_reference
from cuda_emu_testing import check_emulated_forward
from fpn_testing import TOLERANCES
from test_edge_cases import STORAGE_ELEMS, TOP_VIEW, X_VIEWS, _assert_same_special_values, _no_fill, _offsets, _poison

SM_COUNT = 132  # an H100's; split-K is chosen by the host code where the shape asks for it

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def _inputs(n, cin, cout, hw, top_hw, dtype, layout, seed=0, bias=True):
    g = _gen(seed)
    x = _layout(torch.randn((n, cin, *hw), generator=g).to(dtype), layout)
    w = (torch.randn((cout, cin), generator=g) / max(cin, 1) ** 0.5).to(dtype)
    b = torch.randn((cout,), generator=g).to(dtype) if bias else None
    top = _layout(torch.randn((n, cout, *top_hw), generator=g).to(dtype), layout) if top_hw is not None else None
    return x, w, b, top


def _check_grad(emu, dy, top_hw):
    th, tw = top_hw if top_hw is not None else (0, 0)
    db, dtop = emu.grad(dy, th, tw)
    rdb, rdtop = lateral_grad_bias_top_reference(dy.double(), th, tw)
    atol, rtol = TOLERANCES[dy.dtype]
    scale = max(1.0, rdtop.abs().max().item() if rdtop.numel() else 0.0, rdb.abs().max().item() if rdb.numel() else 0.0)
    torch.testing.assert_close(db.double(), rdb, atol=atol * scale, rtol=rtol)
    assert dtop.shape == (dy.shape[0], dy.shape[1], th, tw)
    if th:
        assert dtop.is_contiguous(memory_format=output_memory_format(dy))
    torch.testing.assert_close(dtop.double(), rdtop, atol=atol * scale, rtol=rtol)
    return db, dtop


# ---- degenerate spatial sizes, odd channel counts -------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("top_hw", [(1, 1), (4, 3), (13, 2), None], ids=["top1x1", "top4x3", "top13x2", "no_top"])
@pytest.mark.parametrize("hw", [(1, 1), (1, 9), (9, 1)], ids=["1x1", "1x9", "9x1"])
def test_degenerate_spatial_sizes(cuda_emu, hw, top_hw, dtype, layout):
    x, w, b, top = _inputs(2, 8, 16, hw, top_hw, dtype, layout)
    check_emulated_forward(cuda_emu, x, w, b, top)
    dy = _layout(torch.randn((2, 16, *hw), generator=_gen(3)).to(dtype), layout)
    _check_grad(cuda_emu, dy, top_hw)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("cout", [3, 17, 129])
@pytest.mark.parametrize("cin", [3, 17, 129])
def test_channel_counts_off_the_tile_sizes(cuda_emu, cin, cout, layout):
    x, w, b, top = _inputs(1, cin, cout, (5, 7), (3, 4), torch.float16, layout, seed=cin * 1000 + cout)
    check_emulated_forward(cuda_emu, x, w, b, top)
    dy = _layout(torch.randn((1, cout, 5, 7), generator=_gen(4)).to(torch.float16), layout)
    _check_grad(cuda_emu, dy, (3, 4))


# ---- stride-0 (expanded) inputs -------------------------------------------------------------------

N, CIN, COUT, HW, TOP_HW = 2, 16, 24, (5, 7), (3, 4)
EXPANDED = {   # name: (input, shape of the base that is expanded to the input's full shape)
    "x_over_hw": ("x", (N, CIN, 1, 1)),
    "x_over_channels": ("x", (N, 1, *HW)),
    "x_over_batch_and_w": ("x", (1, CIN, HW[0], 1)),
    "weight_over_cin": ("weight", (COUT, 1)),
    "weight_over_cout": ("weight", (1, CIN)),
    "bias": ("bias", (1,)),
    "top_over_hw": ("top", (N, COUT, 1, 1)),
    "top_over_channels": ("top", (N, 1, *TOP_HW)),
    "top_everything": ("top", (1, 1, 1, 1)),
    # channels_last bases (x channels_last too): channel stride 1, so the 16-byte x / top loads run
    "x_cl_over_batch": ("x_cl", (1, CIN, *HW)),
    "top_cl_over_batch": ("top_cl", (1, COUT, *TOP_HW)),
    "top_cl_over_h": ("top_cl", (N, COUT, 1, TOP_HW[1])),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("which", list(EXPANDED))
def test_expanded_stride0_inputs(cuda_emu, which, dtype):
    role, base_shape = EXPANDED[which]
    cl = role.endswith("_cl")
    role = role.removesuffix("_cl")
    x, w, b, top = _inputs(N, CIN, COUT, HW, TOP_HW, dtype, "channels_last" if cl else "nchw")
    ins = {"x": x, "weight": w, "bias": b, "top": top}
    base = _layout(torch.randn(base_shape, generator=_gen(11)).to(dtype), "channels_last" if cl else "nchw")
    ins[role] = base.expand(ins[role].shape)
    assert 0 in ins[role].stride() and (not cl or ins[role].stride(1) == 1)
    check_emulated_forward(cuda_emu, ins["x"], ins["weight"], ins["bias"], ins["top"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("view", ["hw_transposed", "batch_reversed"])
def test_permuted_and_flipped_views(cuda_emu, view, dtype):
    """x and top as views dense in neither NCHW nor channels_last: H and W swapped by a transpose (H's
    stride 1, W's stride H), or every second image of a larger batch (batch stride two images)."""
    g = _gen(13)
    if view == "hw_transposed":
        x = torch.randn((N, CIN, HW[1], HW[0]), generator=g).to(dtype).transpose(2, 3)
        top = torch.randn((N, COUT, TOP_HW[1], TOP_HW[0]), generator=g).to(dtype).transpose(2, 3)
    else:
        x = torch.randn((2 * N, CIN, *HW), generator=g).to(dtype)[1::2]
        top = _layout(torch.randn((2 * N, COUT, *TOP_HW), generator=g).to(dtype), "channels_last")[::2]
    w = (torch.randn((COUT, CIN), generator=g) / CIN ** 0.5).to(dtype)
    b = torch.randn((COUT,), generator=g).to(dtype)
    assert x.shape == (N, CIN, *HW) and top.shape == (N, COUT, *TOP_HW) and not x.is_contiguous()
    check_emulated_forward(cuda_emu, x, w, b, top)


@pytest.mark.parametrize("base_shape", [(N, COUT, 1, 1), (N, 1, *HW), (1, COUT, 1, HW[1])],
                         ids=["over_hw", "over_channels", "over_batch_and_h"])
def test_expanded_stride0_incoming_gradient(cuda_emu, base_shape):
    dy = torch.randn(base_shape, generator=_gen(12)).half().expand(N, COUT, *HW)
    _check_grad(cuda_emu, dy, TOP_HW)


# ---- NaN / Inf -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("top_hw", [(3, 4), (9, 11)], ids=["upsample", "downsample"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nan_and_inf_propagate_exactly_as_the_reference(cuda_emu, layout, top_hw, dtype):
    x, w, b, top = _poison(*_inputs(2, 5, 6, (5, 7), top_hw, torch.float32, layout))
    if top_hw == (9, 11):  # a top pixel nearest down-sampling never reads must not leak
        unread_h = sorted(set(range(9)) - set(nearest_source_indices(9, 5).tolist()))
        unread_w = sorted(set(range(11)) - set(nearest_source_indices(11, 7).tolist()))
        top[1, 0, unread_h[0], unread_w[0]] = float("nan")
    x, w, b, top = (t.to(dtype) for t in (x, w, b, top))
    out = cuda_emu.lateral(x, w, b, top, SM_COUNT, False)
    ref = lateral_reference(x.double(), w.double(), b.double(), top.double())
    assert torch.isnan(ref).any() and torch.isposinf(ref).any() and torch.isneginf(ref).any()
    _assert_same_special_values(out.double(), ref, *TOLERANCES[dtype])
    if top_hw == (9, 11):
        assert not torch.isnan(out[1, 0]).any(), "a top pixel that is never read leaked into the output"


@pytest.mark.parametrize("top_hw", [(3, 4), (9, 11), None], ids=["upsample", "downsample", "no_top"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nan_and_inf_in_the_incoming_gradient(cuda_emu, layout, top_hw):
    dy = torch.randn((2, 6, 5, 7), generator=_gen(9))
    dy[0, 1, 2, 3] = float("nan")
    dy[1, 2, 0, 0] = float("inf")
    dy[1, 2, 4, 6] = float("-inf")   # channel 2 of db: inf + -inf = NaN
    dy[0, 4, 1, 1] = float("inf")
    dy = _layout(dy, layout)
    th, tw = top_hw if top_hw is not None else (0, 0)
    db, dtop = cuda_emu.grad(dy, th, tw)
    rdb, rdtop = lateral_grad_bias_top_reference(dy.double(), th, tw)
    assert torch.isnan(rdb).any() and torch.isinf(rdb).any()
    _assert_same_special_values(db.double(), rdb)
    _assert_same_special_values(dtop.double(), rdtop)


# ---- the db + dtop launch's size limit --------------------------------------------------------------

@pytest.mark.parametrize("layout,strides", [("nchw", (0, 1, 0, 0)), ("channels_last", (0, 0, 0, 1))])
@pytest.mark.parametrize("size,top_hw", [((2**16, 2**21, 1, 1), (1, 1)), ((2, 8, 4, 4), (2**40, 1)),
                                         ((3, 5, 4, 4), (2**62, 1))], ids=["images-channels", "top-rows", "int64"])
def test_grad_past_one_launch_is_a_clear_error(cuda_emu, size, top_hw, layout, strides):
    """The db + dtop kernel runs one block per (row group, image, channel block) in a 1-D grid (N and C
    were grid y / z axes, at most 65535, until 2026-12-02; test_cuda_kernels.py runs 70001 on a GPU).
    Past the grid's 2^31 - 1 blocks the host code says so before it allocates anything, and the count
    does not overflow int64 for any top size."""
    dy = torch.zeros(max(size[1], size[3])).as_strided(size, strides)  # channels_last-like: stride(1) < stride(3)
    assert (dy.stride(1) < dy.stride(3)) == (layout == "channels_last")
    with pytest.raises(RuntimeError, match=r"needs more than 2147483647 blocks \(row groups x images x channels"):
        cuda_emu.grad(dy, *top_hw)


# ---- element offsets past 2^31 ---------------------------------------------------------------------

BIG = 2**30
# the incoming gradient [3, Cout = 5, H, W] as a view of the same kind as x's (same H, W), passing 2^31
GRAD_VIEWS = {
    "x_batch_stride": ((3, 5, 2, 3), (BIG + 5, 1, 15, 5), 0),
    "x_channel_stride": ((3, 5, 2, 4), (8, 2**29 + 7, 4, 1), 1000),
    "x_row_stride": ((3, 5, 3, 2), (10, 1, BIG + 1, 5), 2000),
}


@pytest.mark.parametrize("with_top", [True, False], ids=["top", "no_top"])
@pytest.mark.parametrize("x_view", list(X_VIEWS))
def test_element_offsets_past_2_31(cuda_emu, x_view, with_top):
    """x, top and then dy are views with huge strides into one 4 GiB fp16 storage (as in
    test_edge_cases.py): the host code and the kernels must index them in 64 bits, forward and db / dtop."""
    xs, gs = X_VIEWS[x_view], GRAD_VIEWS[x_view]
    assert _offsets(*xs).max() - xs[2] > 2**31 and _offsets(*gs).max() - gs[2] > 2**31
    assert _offsets(*gs).unique().numel() == _offsets(*gs).numel(), "the gradient view must not overlap itself"
    with _no_fill():
        storage = torch.empty(STORAGE_ELEMS, dtype=torch.float16)
    g = _gen(21)
    x = storage.as_strided(*xs)
    x.copy_(torch.randn(x.shape, generator=g))
    cin, cout = x.shape[1], TOP_VIEW[0][1]
    w = (torch.randn((cout, cin), generator=g) / cin ** 0.5).half()
    b = torch.randn((cout,), generator=g).half()
    top = None
    if with_top:
        top = storage.as_strided(*TOP_VIEW)
        top.copy_(torch.randn(top.shape, generator=g))
    check_emulated_forward(cuda_emu, x, w, b, top)
    dy = storage.as_strided(*gs)   # written after the forward check: it may share x's and top's elements
    assert dy.shape == (x.shape[0], cout, x.shape[2], x.shape[3])
    dy.copy_(torch.randn(dy.shape, generator=g))
    _check_grad(cuda_emu, dy, tuple(top.shape[2:]) if with_top else None)
    del x, top, dy, storage


# ---- empty sizes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(0, 8, 16, (5, 7)), (2, 8, 16, (0, 7)), (2, 0, 16, (5, 7)), (2, 8, 0, (5, 7))],
                         ids=["batch0", "h0", "cin0", "cout0"])
def test_empty_sizes(cuda_emu, shape, layout):
    """Batch 0 / an empty map give empty outputs; Cin == 0 gives bias + nearest(top); Cout == 0 an
    empty channel dim. Nothing is read out of bounds and every output element is written."""
    n, cin, cout, hw = shape
    top_hw = (3, 4)
    x, w, b, top = _inputs(n, cin, cout, hw, top_hw, torch.float16, layout)
    check_emulated_forward(cuda_emu, x, w, b, top)
    dy = _layout(torch.randn((n, cout, *hw), generator=_gen(2)).half(), layout)
    _check_grad(cuda_emu, dy, top_hw)


# ---- bad input: the host code's checks ----------------------------------------------------------

def _bad_calls(x, w, b, top):
    """(what, expected message fragment, call) for input the CUDA host code must reject."""
    return [
        ("weight of the wrong Cin", r"weight must be \[Cout, Cin\] with Cin", lambda e: e.lateral(x, w[:, :-1], b, top, 132, False)),
        ("3-D weight", r"weight must be 2-D \[Cout, Cin\]", lambda e: e.lateral(x, w[:, :, None], b, top, 132, False)),
        ("3-D x", r"x must be 4-D", lambda e: e.lateral(x[0], w, b, top, 132, False)),
        ("bias of the wrong length", r"bias must be 1-D \[Cout\]", lambda e: e.lateral(x, w, b[:-1], top, 132, False)),
        ("top with the wrong batch", r"top must be", lambda e: e.lateral(x, w, b, top[:1], 132, False)),
        ("top with the wrong channels", r"top must be", lambda e: e.lateral(x, w, b, top[:, :-1], 132, False)),
        ("top with an empty map", r"top", lambda e: e.lateral(x, w, b, top[:, :, :0], 132, False)),
        ("mixed dtypes", r"top dtype", lambda e: e.lateral(x, w, b, top.float(), 132, False)),
        ("float64 (no CUDA kernel)", r"x dtype must be float16, bfloat16 or float32", lambda e: e.lateral(x.double(), w.double(), b.double(),
                                                                              top.double(), 132, False)),
        ("grad with a negative top size", r"top_h and top_w must both be positive", lambda e: e.grad(top, -1, 2)),
        ("grad with one zero top size", r"top_h and top_w must both be positive", lambda e: e.grad(top, 0, 2)),
        ("3-D grad", r"grad_out must be 4-D", lambda e: e.grad(top[0], 2, 2)),
    ]


def test_bad_input_raises_a_clear_error_and_leaves_inputs_unchanged(cuda_emu):
    x, w, b, top = _inputs(2, 8, 16, (5, 7), (3, 4), torch.float16, "channels_last")
    before = [t.clone() for t in (x, w, b, top)]
    versions = [t._version for t in (x, w, b, top)]
    baseline = cuda_emu.lateral(x, w, b, top, SM_COUNT, False)
    for what, message, call in _bad_calls(x, w, b, top):
        with pytest.raises(RuntimeError, match=message):
            call(cuda_emu)
        for t, saved, version in zip((x, w, b, top), before, versions):
            assert torch.equal(t, saved) and t._version == version, f"{what}: an input was modified"
    assert torch.equal(cuda_emu.lateral(x, w, b, top, SM_COUNT, False), baseline), "state left behind"
