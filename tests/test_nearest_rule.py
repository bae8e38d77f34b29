"""The nearest-index rule: bit-identical to F.interpolate(mode="nearest", size=...) for every
(in, out) pair up to 512, in the reference and in the C++ CPU kernel."""
import pytest
import torch
import torch.nn.functional as F

import fused_fpn
from fused_fpn.reference import nearest_source_indices

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
