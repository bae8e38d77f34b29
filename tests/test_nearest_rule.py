"""The nearest-index rule: bit-identical to F.interpolate(mode="nearest", size=...) for every
(in, out) pair up to 512, in the reference and in the C++ CPU kernel."""
import pytest
import torch
import torch.nn.functional as F

import fused_fpn
from fused_fpn.reference import nearest_source_indices, upsample_nearest_reference

MAX_SIZE = 512


def interpolate_indices(in_size: int, out_size: int) -> torch.Tensor:
    src = torch.arange(in_size, dtype=torch.float32).view(1, 1, in_size)
    return F.interpolate(src, size=out_size, mode="nearest").view(-1).to(torch.int64)


def test_float_rule_is_not_the_integer_rule():
    # DESIGN.md: (dst * in) // out differs from ATen's float rule, first at 2 -> 82.
    ours = nearest_source_indices(2, 82)
    integer_rule = torch.arange(82) * 2 // 82
    assert not torch.equal(ours, integer_rule)
    assert torch.equal(ours, interpolate_indices(2, 82))


def test_reference_indices_match_interpolate_for_all_pairs_up_to_512():
    mismatches = []
    for in_size in range(1, MAX_SIZE + 1):
        src = torch.arange(in_size, dtype=torch.float32).view(1, 1, in_size)
        for out_size in range(1, MAX_SIZE + 1):
            expected = F.interpolate(src, size=out_size, mode="nearest").view(-1).to(torch.int64)
            if not torch.equal(nearest_source_indices(in_size, out_size), expected):
                mismatches.append((in_size, out_size))
    assert mismatches == []


@pytest.mark.skipif(not fused_fpn.extension_loaded(), reason="fused_fpn._C not built")
def test_cpu_kernel_gathers_the_interpolate_index_for_all_pairs_up_to_512():
    """lateral with a zero weight returns exactly the gathered top; top holds its own column index."""
    op = torch.ops.fused_fpn.lateral
    mismatches = []
    for in_size in range(1, MAX_SIZE + 1):
        top = torch.arange(in_size, dtype=torch.float32).view(1, 1, 1, in_size)
        weight = torch.zeros((1, 1))
        for out_size in range(1, MAX_SIZE + 1):
            x = torch.zeros((1, 1, 1, out_size))
            got = op(x, weight, None, top).view(-1).to(torch.int64)
            if not torch.equal(got, interpolate_indices(in_size, out_size)):
                mismatches.append((in_size, out_size))
    assert mismatches == []


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("h,w,ht,wt", [(82, 5, 2, 3), (7, 9, 13, 17), (33, 47, 9, 12), (1, 1, 5, 4), (64, 3, 32, 1)])
def test_two_dimensional_gather_matches_interpolate(backend, h, w, ht, wt):
    if backend not in fused_fpn.available_backends("cpu"):
        pytest.skip(f"backend {backend} not available")
    top = torch.arange(ht * wt, dtype=torch.float32).view(1, 1, ht, wt)
    x = torch.zeros((1, 1, h, w))
    got = fused_fpn.lateral(x, torch.zeros((1, 1)), None, top, backend=backend)
    assert torch.equal(got, F.interpolate(top, size=(h, w), mode="nearest"))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("top_format", [torch.contiguous_format, torch.channels_last])
def test_reference_gather_in_either_memory_format_is_interpolate(memory_format, top_format):
    """The reference gathers in the output's memory format (channels_last: on top's [N, Ht, Wt, C]
    view): the same values and gradient as F.interpolate, with the requested strides, whatever
    top's own layout."""
    top = torch.randn(2, 5, 7, 9).contiguous(memory_format=top_format).requires_grad_(True)
    got = upsample_nearest_reference(top, (17, 13), memory_format)
    assert got.is_contiguous(memory_format=memory_format)
    leaf = top.detach().clone().requires_grad_(True)
    expected = F.interpolate(leaf, size=(17, 13), mode="nearest")
    assert torch.equal(got, expected)
    grad = torch.randint(-8, 9, (2, 5, 17, 13)).float()   # small integers: exact sums in any order
    got.backward(grad)
    expected.backward(grad)
    assert torch.equal(top.grad, leaf.grad)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_source_index_is_clamped_where_float32_sizes_round_past_the_last_row(backend):
    """2^24 + 3 source columns gathered onto 2^24 + 5: both sizes round to 2^24 + 4 in float32, so the
    scale is 1 and the last two destinations compute sources 2^24 + 3 and 2^24 + 4, past the last
    column, 2^24 + 2: the rule's min(., in - 1) takes them back, as ATen does. Forward and top's
    gradient against F.interpolate (the Triton kernels: test_triton_interpret.py's index tests; 2^24
    columns are too many interpreted programs)."""
    if backend not in fused_fpn.available_backends("cpu"):
        pytest.skip(f"backend {backend} does not run on CPU tensors here")
    src, dst = 2**24 + 3, 2**24 + 5
    top = (torch.arange(src) % 4093).to(torch.float32).view(1, 1, 1, src).requires_grad_(True)
    out = fused_fpn.lateral(torch.zeros((1, 1, 1, dst)), torch.zeros(1, 1), None, top, backend=backend)
    leaf = top.detach().requires_grad_(True)
    expected = F.interpolate(leaf, size=(1, dst), mode="nearest")
    assert expected[0, 0, 0, -2:].tolist() == [float((src - 1) % 4093)] * 2
    assert torch.equal(out.detach(), expected.detach())
    out.backward(torch.ones_like(out))
    expected.backward(torch.ones_like(expected))
    assert torch.equal(top.grad, leaf.grad)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("axis", ["h", "w"])
def test_sources_past_2_24_round_the_size_to_float32_as_interpolate(backend, axis):
    """A top of 2^24 + 3 rows (or columns) gathered onto 5: ATen casts the sizes to float32 before
    dividing (2^24 + 3 becomes 2^24 + 4), so a scale from the exact integers picks another row
    (3355443 instead of 3355444 at d = 1). Zero weight: the output is the gathered top; on the
    CPU backends the top's gradient too (each source row counts its preimage). The Triton kernels
    run under the interpreter here, forward only (a 2^24-column top is half a million programs)."""
    if backend not in fused_fpn.available_backends("cpu"):
        pytest.skip(f"backend {backend} does not run on CPU tensors here")
    src, dst = 2**24 + 3, 5
    x_shape, top_shape = ((1, 1, dst, 1), (1, 1, src, 1)) if axis == "h" else ((1, 1, 1, dst), (1, 1, 1, src))
    top = torch.arange(src, dtype=torch.float32).view(top_shape)   # values < 2^24: exact in float32
    top.requires_grad_(backend != "triton")
    out = fused_fpn.lateral(torch.zeros(x_shape), torch.zeros(1, 1), None, top, backend=backend)
    expected = F.interpolate(top.detach(), size=x_shape[2:], mode="nearest")
    assert expected.flatten()[1].item() == 3355444
    assert torch.equal(out.detach(), expected)
    if backend != "triton":
        out.backward(torch.ones_like(out))
        leaf = top.detach().requires_grad_(True)
        F.interpolate(leaf, size=x_shape[2:], mode="nearest").backward(torch.ones(x_shape))
        assert torch.equal(top.grad, leaf.grad)
