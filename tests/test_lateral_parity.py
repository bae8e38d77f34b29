"""Forward parity of ``fused_fpn.lateral`` for every backend that runs here, against the float64
reference (indices in float32) and torchvision's eager computation, over dtypes x layouts x odd
sizes x bias/top present or absent, with NaN-poisoned outputs (conftest)."""
import math

import pytest
import torch

import fused_fpn
from fpn_testing import (HAS_CUDA, assert_close_to_reference, backend_device_params, backend_supports,
                         eager_lateral, make_lateral_case, to64)

# (N, Cin, Cout, (H, W), (Ht, Wt)): odd sizes, exact 2x, non-integer up-sampling, down-sampling, 1x1
SHAPES = [
    (2, 17, 13, (9, 13), (5, 7)),
    (1, 32, 24, (8, 8), (4, 4)),
    (2, 3, 5, (7, 9), (4, 5)),
    (1, 33, 129, (5, 6), (9, 11)),      # top larger than x: nearest down-sampling
    (3, 8, 16, (1, 1), (1, 1)),
    (1, 64, 40, (33, 47), (17, 24)),
]
LAYOUTS = ["nchw", "channels_last", "noncontig"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


pytestmark = pytest.mark.usefixtures("no_tf32")   # IEEE fp32 on GPUs (conftest)


def _skip_unsupported(backend, device, dtype):
    reason = backend_supports(backend, device, dtype)
    if reason is not None:
        pytest.skip(f"{backend} on {device} {dtype}: {reason}")


@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, [s[0], s[1], s[2], *s[3], *s[4]])))
@pytest.mark.parametrize("with_top", [True, False], ids=["top", "no_top"])
def test_forward_matches_reference_and_eager(device, backend, dtype, layout, shape, with_top):
    """Every row also checks the float64 reference against eager (F.conv2d + F.interpolate + add at
    ``dtype``), so the "torch" backend, which is the reference, is not only compared with itself.
    Without top the cpu backend runs a dense x through ATen's conv2d, a strided view through its tiles."""
    _skip_unsupported(backend, device, dtype)
    n, cin, cout, hw, top_hw = shape
    x, w, b, top = make_lateral_case(n, cin, cout, hw, top_hw, dtype, device, layout, with_top=with_top)
    out = fused_fpn.lateral(x, w, b, top, backend=backend)
    assert out.shape == (n, cout, *hw) and out.dtype == dtype and out.device == x.device
    ref = fused_fpn.lateral_reference(*to64(x, w, b, top))
    assert_close_to_reference(out, ref, dtype, eager_lateral(x, w, b, top))


@pytest.mark.skipif("cpu" not in fused_fpn.available_backends("cpu"), reason="fused_fpn._C not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] == 1], ids=lambda s: "x".join(map(str, [s[1], s[2], *s[3]])))
def test_cpu_fp16_bf16_are_eagers_bit_for_bit_on_one_tile(dtype, layout, shape):
    """The cpu kernel's tile GEMM is ATen's conv2d with the bias, rounded to the output dtype before the
    epilogue adds top, as eager's conv2d + add round: on an image of one tile with batch 1 (the very
    conv2d call eager makes) fp16 / bf16 outputs are eager's bit for bit. With the bias added in the
    epilogue instead (before 2026-12-04) bf16 differed in about a third of the elements."""
    _, cin, cout, hw, top_hw = shape
    x, w, b, top = make_lateral_case(1, cin, cout, hw, top_hw, dtype, "cpu", layout)
    assert torch.equal(fused_fpn.lateral(x, w, b, top, backend="cpu"), eager_lateral(x, w, b, top))


@pytest.mark.skipif("cpu" not in fused_fpn.available_backends("cpu"), reason="fused_fpn._C not built")
@pytest.mark.parametrize("with_top", [False, True], ids=["no_top", "top"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_never_copies_a_strided_x_whole(with_top, dtype):
    """A strided view of x (neither NCHW- nor channels_last-dense) is read tile by tile: no copy of the
    whole of x, with or without a top (a level without one once went to ATen's conv2d, which copies
    such a view first), and the numbers are the reference's."""
    x, w, b, top = make_lateral_case(2, 24, 16, (33, 40), (17, 20), dtype, "cpu", "noncontig", with_top=with_top)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fused_fpn.lateral(x, w, b, top, backend="cpu")
    copies = [e for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
    assert copies, "the profiler saw no copy at all: the tiles' own packing copies should show"
    # a copy of all of x, in any shape (a permuted .contiguous() too); the tiles hold one image each here
    whole = [e.input_shapes[0] for e in copies if e.input_shapes and e.input_shapes[0]
             and math.prod(e.input_shapes[0]) >= x.numel()]
    assert not whole, f"x ({x.numel()} elements) was copied whole: {whole}"
    ref = fused_fpn.lateral_reference(*to64(x, w, b, top))
    assert_close_to_reference(out, ref, dtype, eager_lateral(x, w, b, top))


# The cpu kernel's epilogue routes (csrc/cpu/lateral_cpu.cpp), each on an image of 3 tiles (a tile is
# ~2 MiB of output rows: 64 rows of 64 channels x 128 columns in fp32, 128 in bf16): (x layout,
# top's size, how top is laid out) -> the route it takes.
_EPILOGUE_ROUTES = {
    "cl_channels_contiguous": ("channels_last", (65, 64), "same"),       # add_rows over a pixel's channels
    "cl_channels_gathered": ("channels_last", (65, 64), "nchw"),         # top NCHW: channels gathered first
    "nchw_columns_doubled": ("nchw", (65, 64), "same"),                  # add_rows_doubled, 2x columns
    "nchw_row_gathered_3x": ("nchw", (44, 43), "same"),                  # 3x: the row gathered, then added
    "nchw_strided_top_columns": ("nchw", (65, 64), "every_other_column"),  # top's column stride 2
    "nchw_downsampled": ("nchw", (260, 256), "same"),                    # top larger than x
}


@pytest.mark.skipif("cpu" not in fused_fpn.available_backends("cpu"), reason="fused_fpn._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("route", list(_EPILOGUE_ROUTES))
def test_cpu_epilogue_routes_over_several_tiles(route, dtype):
    """Each route of the cpu kernel's epilogue (vectorized rows where out and the tile have unit
    stride along the inner loop; the top row or pixel read in place, doubled, or gathered first),
    over an image of several tiles, against the float64 reference and eager's conv2d + interpolate +
    add; a Cin == 0 level (bias added in the epilogue) takes the element-wise loops."""
    layout, top_hw, top_kind = _EPILOGUE_ROUTES[route]
    x, w, b, top = make_lateral_case(2, 24, 64, (130, 128), top_hw if top_kind != "every_other_column"
                                     else (top_hw[0], 2 * top_hw[1]), dtype, "cpu", layout)
    if top_kind == "nchw":
        top = top.contiguous()
    elif top_kind == "every_other_column":
        top = top[..., ::2]
    assert top.shape[-2:] == top_hw
    out = fused_fpn.lateral(x, w, b, top, backend="cpu")
    ref = fused_fpn.lateral_reference(*to64(x, w, b, top))
    assert_close_to_reference(out, ref, dtype, eager_lateral(x, w, b, top))
    if dtype == torch.float32:   # Cin == 0: out = bias + top, by the element-wise loops
        x0, w0 = x[:, :0], w[:, :0]
        torch.testing.assert_close(fused_fpn.lateral(x0, w0, b, top, backend="cpu"),
                                   fused_fpn.lateral_reference(*to64(x0, w0, b, top)).float(), atol=0, rtol=0)


@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("with_bias,with_top", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bias_and_top_optional(device, backend, with_bias, with_top, layout):
    x, w, b, top = make_lateral_case(2, 19, 11, (6, 10), (3, 5), torch.float32, device, layout,
                                     with_bias=with_bias, with_top=with_top)
    out = fused_fpn.lateral(x, w, b, top, backend=backend)
    assert_close_to_reference(out, fused_fpn.lateral_reference(*to64(x, w, b, top)), torch.float32,
                              eager_lateral(x, w, b, top))


@pytest.mark.parametrize("device,backend", backend_device_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_output_memory_format_follows_x(device, backend, layout):
    x, w, b, top = make_lateral_case(2, 8, 16, (5, 7), (3, 4), torch.float32, device, layout)
    out = fused_fpn.lateral(x, w, b, top, backend=backend)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device,backend", backend_device_params())
def test_weight_as_conv_kernel_and_batch_zero(device, backend):
    x, w, b, top = make_lateral_case(2, 8, 6, (4, 4), (2, 2), torch.float32, device, "nchw")
    out4 = fused_fpn.lateral(x, w[:, :, None, None], b, top, backend=backend)
    out2 = fused_fpn.lateral(x, w, b, top, backend=backend)
    assert torch.equal(out4, out2)
    empty = fused_fpn.lateral(x[:0], w, b, top[:0], backend=backend)
    assert empty.shape == (0, 6, 4, 4)


@pytest.mark.parametrize("device,backend", backend_device_params())
def test_expanded_stride0_input(device, backend):
    x, w, b, top = make_lateral_case(1, 5, 7, (4, 6), (2, 3), torch.float32, device, "nchw")
    xe = x.expand(3, -1, -1, -1)          # stride 0 over the batch
    te = top.expand(3, -1, -1, -1)
    out = fused_fpn.lateral(xe, w, b, te, backend=backend)
    assert_close_to_reference(out, fused_fpn.lateral_reference(*to64(xe, w, b, te)), torch.float32)


@pytest.mark.parametrize("device,backend", backend_device_params())
def test_nan_and_inf_propagate_like_the_reference(device, backend):
    x, w, b, top = make_lateral_case(1, 4, 3, (4, 4), (2, 2), torch.float32, device, "nchw")
    x[0, 1, 2, 3] = float("nan")
    top[0, 2, 0, 0] = float("inf")
    out = fused_fpn.lateral(x, w, b, top, backend=backend)
    ref = fused_fpn.lateral_reference(x, w, b, top)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))


@pytest.mark.parametrize("device,backend", backend_device_params())
def test_deterministic_forward(device, backend):
    x, w, b, top = make_lateral_case(2, 40, 24, (9, 11), (5, 6), torch.float32, device, "channels_last")
    a = fused_fpn.lateral(x, w, b, top, backend=backend)
    c = fused_fpn.lateral(x, w, b, top, backend=backend)
    assert torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [n for n in ("triton", "cuda")])
def test_tf32_follows_cudnn_flag(backend):
    if backend not in fused_fpn.available_backends("cuda"):
        pytest.skip(f"{backend} not available")
    x, w, b, top = make_lateral_case(2, 256, 64, (16, 16), (8, 8), torch.float32, "cuda", "channels_last")
    ref = fused_fpn.lateral_reference(*to64(x, w, b, top))
    torch.backends.cudnn.allow_tf32 = False
    ieee = fused_fpn.lateral(x, w, b, top, backend=backend)
    torch.backends.cudnn.allow_tf32 = True
    tf32 = fused_fpn.lateral(x, w, b, top, backend=backend)
    err_ieee = ((ieee.double() - ref).norm() / ref.norm()).item()
    err_tf32 = ((tf32.double() - ref).norm() / ref.norm()).item()
    assert err_ieee < 1e-5, err_ieee
    assert err_tf32 < 3e-3, err_tf32
    # and TF32 really ran when allowed (a 10-bit mantissa over Cin = 256: about 1e-4, against IEEE's 1e-7)
    assert err_tf32 > 10 * err_ieee, (err_tf32, err_ieee)
