"""The "triton" backend against the float64 reference, torchvision, opcheck and torch.compile.

Without a GPU (CI) these run the Triton kernels on CPU tensors through the interpreter
(conftest.py sets TRITON_INTERPRET=1 before triton is imported); with a GPU the SAME tests run on
CUDA tensors with real compilation (autotuned configs) and add bfloat16. Shapes stay small
(M in the hundreds, C <= 64) so each interpreter test takes well under a few seconds.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fused_fpn
from fused_fpn import backends as fb
from fused_fpn._layout import output_memory_format
from fused_fpn.reference import lateral_grad_bias_top_reference, lateral_reference

from fpn_testing import (HAS_CUDA, TOLERANCES, SymbolicSizes, assert_close_to_reference, eager_lateral,
                         gradient_penalty_grads, make_input, make_lateral_case, only_tma_config, to64)

_REASON = fb.unavailable_reason("triton")
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=f"triton backend unavailable: {_REASON}")]
# With a GPU these tests run on CUDA tensors (DEVICE), and no "cuda" is in their ids: the "gpu" marker
# then puts them in gpu_run.sh's selection of the GPU rows (-k "(cuda or gpu) and not emulated").
if HAS_CUDA:
    pytestmark.append(pytest.mark.gpu)

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
LAYOUTS = ["nchw", "channels_last", "noncontig"]

# (N, Cin, Cout, H, W, top (Ht, Wt) or None, bias?)
CASES = {
    "up_odd": (2, 17, 33, 7, 9, (4, 5), True),
    "down": (1, 3, 17, 5, 6, (9, 11), True),
    "no_top": (2, 33, 17, 7, 9, None, True),
    "no_bias": (2, 17, 33, 8, 6, (4, 3), False),
    "neither": (1, 64, 48, 6, 7, None, False),
    "exact2x": (1, 40, 64, 8, 10, (4, 5), True),
    "float_rule": (1, 5, 3, 82, 3, (2, 1), True),   # 2 -> 82: the integer rule picks other rows
    "wide": (2, 24, 80, 11, 13, (6, 7), True),      # several row groups x column tiles, split dW
    "ones": (1, 1, 1, 1, 3, (1, 2), True),         # sizes/strides equal to 1 (specialized by triton)
}


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 parity is checked against IEEE fp32: switch TF32 off (the kernels follow cudnn's flag)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _inputs(case, dtype, layout, seed=0):
    n, cin, cout, h, w, top_hw, has_bias = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = make_input((n, cin, h, w), dtype, DEVICE, layout, generator=g)
    weight = (torch.randn((cout, cin), generator=g) / max(cin, 1) ** 0.5).to(DEVICE, dtype)
    bias = torch.randn((cout,), generator=g).to(DEVICE, dtype) if has_bias else None
    top = make_input((n, cout) + top_hw, dtype, DEVICE, layout, generator=g) if top_hw else None
    return x, weight, bias, top


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_(True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(case, dtype, layout):
    x, weight, bias, top = _inputs(case, dtype, layout)
    out = fused_fpn.lateral(x, weight, bias, top, backend="triton")
    assert out.shape == (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    assert out.dtype == dtype and out.device == x.device
    fmt = output_memory_format(x)
    assert out.is_contiguous(memory_format=fmt), f"output should follow x's memory format {fmt}"
    ref64 = lateral_reference(x.double(), weight.double(), _f64(bias), _f64(top)).detach()
    eager = eager_lateral(x, weight, bias, top)
    assert_close_to_reference(out, ref64, dtype, eager)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_reference(case, dtype, layout):
    x, weight, bias, top = _inputs(case, dtype, layout)
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, weight, bias, top)]
    out = fused_fpn.lateral(*leaves, backend="triton")
    leaves64 = [_f64(t) for t in (x, weight, bias, top)]
    ref = lateral_reference(*leaves64)
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    out.backward(grad.to(DEVICE, dtype))
    ref.backward(grad.to(DEVICE))
    atol, rtol = TOLERANCES[dtype]
    for name, ours, theirs in zip(("x", "weight", "bias", "top"), leaves, leaves64):
        if ours is None:
            continue
        assert ours.grad is not None, f"no gradient for {name}"
        assert ours.grad.shape == ours.shape and ours.grad.dtype == dtype
        assert not torch.isnan(ours.grad).any(), f"d{name} has NaN: an element was not written"
        # fan-in of dW is N*H*W (up to a few hundred): scale the tolerance with the gradient's size
        scale = max(1.0, theirs.grad.abs().max().item())
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=atol * scale, rtol=rtol,
                                   msg=lambda m, name=name: f"d{name}: {m}")
    # (a leaf's .grad takes the leaf's layout whatever the backward returns: AccumulateGrad; so the
    # layout is checked on the backward op's own dx)
    _, bwd = fb.get_backend("triton").ops()
    top_hw = top.shape[2:] if top is not None else (0, 0)
    dx = bwd(grad.to(DEVICE, dtype), x, weight, *top_hw, True, False, False, False)[0]
    assert dx.is_contiguous(memory_format=output_memory_format(x)), "dx should follow x's layout"


def _ulps(got: torch.Tensor, ref: torch.Tensor, mantissa_bits: int) -> float:
    """max |got - ref| in units in the last place of ``ref`` in a format of ``mantissa_bits``, over the
    elements of at least a quarter of ref's RMS (near zero a float32 sum's own error is ulps of a
    tiny value)."""
    ref = ref.detach().double()
    keep = ref.abs() >= 0.25 * ref.pow(2).mean().sqrt()
    ref = ref[keep]
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs())) - mantissa_bits)
    return ((got.detach().double()[keep] - ref).abs() / ulp).max().item()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
def test_half_precision_results_are_rounded_once(dtype, layout):
    """fp16 / bf16 forward and gradients accumulate in float32 and round once (the kernels' fp32
    accumulators, dW's and db's fp32 partial sums): each is within 0.55 ulp of the float64 result,
    a long reduction (Cin 256; dW over several splits of N*H*W) included. The per-dtype tolerances
    of the other tests pass an accumulator in the half dtype (several ulps) unnoticed."""
    mantissa = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    g = torch.Generator().manual_seed(8)
    x = make_input((2, 256, 9, 11), dtype, DEVICE, layout, generator=g)
    weight = (torch.randn((48, 256), generator=g) / 16).to(DEVICE, dtype)
    bias = torch.randn((48,), generator=g).to(DEVICE, dtype)
    top = make_input((2, 48, 5, 6), dtype, DEVICE, layout, generator=g)
    dy = make_input((2, 48, 9, 11), dtype, DEVICE, layout, generator=g)
    leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias, top)]
    out = fused_fpn.lateral(*leaves, backend="triton")
    out.backward(dy)
    leaves64 = [_f64(t) for t in (x, weight, bias, top)]
    ref = lateral_reference(*leaves64)
    ref.backward(dy.double())
    assert _ulps(out, ref, mantissa) <= 0.55, "output"
    for name, ours, theirs in zip(("x", "weight", "bias", "top"), leaves, leaves64):
        assert _ulps(ours.grad, theirs.grad, mantissa) <= 0.55, f"d{name}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_partial_gradients(dtype):
    """Only some inputs need a gradient: the others get None and the needed ones are right."""
    x, weight, bias, top = _inputs("up_odd", dtype, "channels_last")
    weight = weight.detach().requires_grad_(True)
    top = top.detach().requires_grad_(True)
    out = fused_fpn.lateral(x, weight, bias, top, backend="triton")
    grad = torch.ones_like(out)
    out.backward(grad)
    w64, t64 = _f64(weight), _f64(top)
    lateral_reference(x.double(), w64, bias.double(), t64).backward(grad.double())
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(weight.grad.double(), w64.grad, atol=atol * w64.grad.abs().max().item(), rtol=rtol)
    torch.testing.assert_close(top.grad.double(), t64.grad, atol=atol, rtol=rtol)
    assert x.grad is None and bias.grad is None


@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("case", ["up_odd", "down", "no_top"])
def test_double_backward_matches_reference(case):
    """create_graph=True (e.g. a gradient penalty): the gradients of the gradients, fp32 against
    the float64 reference's autograd."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None
              for t in _inputs(case, torch.float32, "channels_last")]
    leaves64 = [_f64(t) for t in leaves]
    results = [sum(gradient_penalty_grads(fn, ins), []) for fn, ins in (
        (lambda *a: fused_fpn.lateral(*a, backend="triton"), leaves), (lateral_reference, leaves64))]
    for ours, theirs in zip(*results):
        scale = max(1.0, theirs.abs().max().item())
        torch.testing.assert_close(ours.double(), theirs, atol=1e-4 * scale, rtol=1e-4)


@pytest.mark.parametrize("case", ["up_odd", "no_top"])
def test_forward_mode_ad_matches_reference(case):
    """torch.autograd.forward_ad through the triton backend: tangents on x, weight and top (the
    registered op alone would drop them; fused_fpn.backends.triton.lateral adds them)."""
    import torch.autograd.forward_ad as fwAD
    x, weight, bias, top = _inputs(case, torch.float32, "channels_last")
    gen = torch.Generator().manual_seed(5)
    tx, tw = (torch.randn(t.shape, generator=gen).to(DEVICE) for t in (x, weight))
    tt = torch.randn(top.shape, generator=gen).to(DEVICE) if top is not None else None
    with fwAD.dual_level():
        dual_top = fwAD.make_dual(top, tt) if top is not None else None
        y = fused_fpn.lateral(fwAD.make_dual(x, tx), fwAD.make_dual(weight, tw), bias, dual_top, backend="triton")
        out, tangent = fwAD.unpack_dual(y)
    assert tangent is not None, "the tangent was dropped"
    bias64 = bias.double() if bias is not None else None
    if top is None:
        ref, ref_t = torch.func.jvp(lambda a, w: lateral_reference(a, w, bias64, None),
                                    (x.double(), weight.double()), (tx.double(), tw.double()))
    else:
        ref, ref_t = torch.func.jvp(lambda a, w, t: lateral_reference(a, w, bias64, t),
                                    (x.double(), weight.double(), top.double()),
                                    (tx.double(), tw.double(), tt.double()))
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tangent.double(), ref_t, atol=1e-4, rtol=1e-4)


# Size pairs where the integer rule (dst * in) // out differs from ATen's float32 rule, up- and
# down-sampling ((26, 22): top 26 -> x 22; (39, 33): top 39 -> x 33).
INDEX_PAIRS = [((82, 2), (22, 26)), ((46, 14), (33, 39)), ((69, 21), (58, 30)), ((7, 9), (5, 3))]


@pytest.mark.parametrize("scales", ["host", "in_kernel"])
@pytest.mark.parametrize("pairs", INDEX_PAIRS, ids=lambda p: f"{p[0][0]}from{p[0][1]}x{p[1][0]}from{p[1][1]}")
def test_nearest_indices_bit_identical_to_interpolate(pairs, scales, monkeypatch):
    """With a zero weight the output IS the gathered top: it must equal F.interpolate exactly, and
    the adjoint of ones must count each top pixel's preimage exactly (the kernels' inverse search).
    "in_kernel": the kernels' SCALE_IN_KERNEL variant (scales and search depths computed in the
    kernel, what a trace with symbolic sizes launches), forced on these concrete sizes."""
    from fused_fpn.kernels import lateral_launch as L
    monkeypatch.setattr(L, "FORCE_SCALE_IN_KERNEL", scales == "in_kernel")
    (h, ht), (w, wt) = pairs
    x = torch.randn((1, 1, h, w), device=DEVICE)
    weight = torch.zeros((2, 1), device=DEVICE)
    top = (torch.arange(2 * ht * wt, dtype=torch.float32, device=DEVICE).view(1, 2, ht, wt)
           .requires_grad_(True))
    out = fused_fpn.lateral(x, weight, None, top, backend="triton")
    expected = F.interpolate(top.detach(), size=(h, w), mode="nearest")
    assert torch.equal(out.detach(), expected)
    grad = torch.ones_like(out)
    out.backward(grad)
    db_ref, dtop_ref = lateral_grad_bias_top_reference(grad, ht, wt)
    assert torch.equal(top.grad, dtop_ref)
    assert top.grad.sum().item() == 2 * h * w  # every x pixel lies in exactly one preimage, 2 channels


def _run_nearest_probe(dst_sizes, src_sizes, d, t):
    rows, cols = d.shape
    i32 = dict(dtype=torch.int32, device=DEVICE)
    src_out, first_out = torch.full((rows, cols), -7, **i32), torch.full((rows, cols), -7, **i32)
    from triton_probes import nearest_probe
    per_program = rows if DEVICE == "cpu" else min(rows, 4)   # the interpreter: one program; a GPU: small tiles
    nearest_probe[(rows // per_program,)](torch.tensor(dst_sizes, **i32), torch.tensor(src_sizes, **i32),
                                          d.to(**i32), t.to(**i32), src_out, first_out, max(dst_sizes),
                                          ROWS=per_program, COLS=cols)
    return src_out.cpu().long(), first_out.cpu().long()


def test_search_steps_is_bit_length_plus_one():
    """The preimage search's depth, computed in the kernel from the size (bit_length(DST) + 1)."""
    from triton_probes import search_steps_probe
    sizes = [0, 1, 2, 3, 4, 7, 8, 255, 256, 257, 1216, 2**24 + 1, 2**30, 2**31 - 2**20]
    dst = torch.tensor(sizes, dtype=torch.int32, device=DEVICE)
    out = torch.full((len(sizes),), -7, dtype=torch.int32, device=DEVICE)
    search_steps_probe[(len(sizes),)](dst, out)
    assert out.cpu().tolist() == [s.bit_length() + 1 for s in sizes]


def test_index_helpers_match_interpolate_for_all_pairs_up_to_512():
    """The Triton kernels' nearest index (forward gather) equals F.interpolate's for every (in, out)
    pair up to 512 (the reference's indices, which tests/test_nearest_rule.py checks against
    F.interpolate for the same pairs), and the backward's preimage search returns, for every source
    index t, the first destination index that maps to t or above (as the reference's table says)."""
    from fused_fpn.reference import nearest_source_indices
    n = 512
    dst_sizes = list(range(1, n + 1))
    d = torch.arange(n).expand(n, n)          # row r: destination indices of DST = r + 1
    mismatches = []
    for src_size in range(1, n + 1):
        t = torch.arange(n).clamp(max=src_size).expand(n, n)   # source indices 0..SRC (SRC: past the end)
        src_got, first_got = _run_nearest_probe(dst_sizes, [src_size] * n, d, t)
        for dst_size in dst_sizes:
            table = nearest_source_indices(src_size, dst_size)
            first = torch.searchsorted(table, torch.arange(src_size + 1))   # smallest d with table[d] >= t
            row = dst_size - 1
            k = min(src_size + 1, n)   # t = SRC (first = DST) too, where the row has room for it
            if not (torch.equal(src_got[row, :dst_size], table) and torch.equal(first_got[row, :k], first[:k])):
                mismatches.append((src_size, dst_size))
    assert mismatches == []


def test_preimage_search_has_no_int32_overflow_past_2_30():
    """Destination sizes of 2^30 and more (a 1 x 2^30 map is 2^30 pixels, within the kernels' limit):
    the search's midpoint must not pass 2^31 in int32. Checked against the same search in Python
    integers (the rule in float32, as numpy computes it)."""
    import numpy as np
    from fused_fpn.kernels.lateral_launch import nearest_scale
    cases = [(2**30 + 7, 5), (2**31 - 2**20, 3), (2**30, 2**30 - 1)]
    d_rows, t_rows, want_src, want_first = [], [], [], []
    for dst_size, src_size in cases:
        scale = np.float32(nearest_scale(src_size, dst_size))

        def src_of(i):
            return min(int(np.floor(np.float32(i) * scale)), src_size - 1)

        def first_of(t):
            lo, hi = 0, dst_size
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if src_of(mid) >= t else (mid + 1, hi)
            return lo
        ds = [0, 1, dst_size // 2, dst_size - 3, dst_size - 2, dst_size - 1, dst_size // 3, 2 * (dst_size // 3)]
        ts = [min(t, src_size) for t in (0, 1, 2, src_size // 2, src_size - 2, src_size - 1, src_size, 3)]
        d_rows.append(ds), t_rows.append(ts)
        want_src.append([src_of(i) for i in ds]), want_first.append([first_of(t) for t in ts])
    rows = 4   # a power of two: one padding row repeats the last case
    pad = lambda rs: rs + [rs[-1]] * (rows - len(rs))   # noqa: E731
    src_got, first_got = _run_nearest_probe(pad([c[0] for c in cases]), pad([c[1] for c in cases]),
                                            torch.tensor(pad(d_rows)), torch.tensor(pad(t_rows)))
    assert src_got[:len(cases)].tolist() == want_src
    assert first_got[:len(cases)].tolist() == want_first
    assert want_first[0][6] == 2**30 + 7 and want_first[0][1] > 2**27, "the search really runs past 2^30"


def test_backward_is_deterministic():
    """No atomics: two backward passes give bit-identical gradients."""
    x, weight, bias, top = _inputs("exact2x", torch.float32, "channels_last")
    grads = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias, top)]
        out = fused_fpn.lateral(*leaves, backend="triton")
        out.backward(torch.linspace(-1, 1, out.numel(), device=DEVICE).view(out.shape))
        grads.append([t.grad.clone() for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_empty_input():
    x = torch.randn((2, 5, 0, 4), device=DEVICE, requires_grad=True)
    weight = torch.randn((3, 5), device=DEVICE, requires_grad=True)
    bias = torch.randn((3,), device=DEVICE, requires_grad=True)
    out = fused_fpn.lateral(x, weight, bias, None, backend="triton")
    assert out.shape == (2, 3, 0, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_weight_4d_and_unsupported_dtype():
    x, weight, bias, top = _inputs("up_odd", torch.float32, "nchw")
    out4 = fused_fpn.lateral(x, weight[:, :, None, None], bias, top, backend="triton")
    out2 = fused_fpn.lateral(x, weight, bias, top, backend="triton")
    assert torch.equal(out4, out2)
    with pytest.raises(ValueError, match="triton"):
        fused_fpn.lateral(x.double(), weight.double(), bias.double(), top.double(), backend="triton")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="bfloat16"):
            fused_fpn.lateral(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), top.bfloat16(), backend="triton")


def test_registered_ops_pass_opcheck():
    from fused_fpn.backends import triton as tb
    fwd, bwd = tb.ops()
    x, weight, bias, top = _inputs("up_odd", torch.float32, "channels_last")
    torch.library.opcheck(fwd, (x, weight, bias, top))
    torch.library.opcheck(fwd, (x, weight, None, None))
    leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias, top)]
    torch.library.opcheck(fwd, tuple(leaves))
    grad = torch.randn((2, 33, 7, 9), device=DEVICE).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(bwd, (grad, x, weight, 4, 5, True, True, True, True))
    torch.library.opcheck(bwd, (grad, x, weight, 0, 0, False, True, True, False))
    expected = "triton_op" if DEVICE == "cuda" and not tb.interpreting() else "custom_op"
    assert tb.registration_mode() == expected


def test_torch_compile_fullgraph_matches_eager():
    x, weight, bias, top = _inputs("up_odd", torch.float32, "channels_last")

    def f(x, weight, bias, top):
        return torch.tanh(fused_fpn.lateral(x, weight, bias, top, backend="triton")) * 2.0

    def run(fn):
        leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias, top)]
        out = fn(*leaves)
        out.sum().backward()
        return out.detach(), [t.grad for t in leaves]

    # eager first: it also loads the backend module (backends.select imports it on first use,
    # which dynamo cannot trace)
    eager_out, eager_grads = run(f)
    torch._dynamo.reset()
    compiled_out, compiled_grads = run(torch.compile(f, fullgraph=True))
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fpn_matches_torchvision(dtype):
    from torchvision.ops import FeaturePyramidNetwork
    torch.manual_seed(0)
    in_channels = [8, 16, 32]
    tv = FeaturePyramidNetwork(in_channels, 16).to(DEVICE)
    ours = fused_fpn.FPN(in_channels, 16, backend="triton").to(DEVICE)
    ours.load_state_dict(tv.state_dict())
    tv64 = copy.deepcopy(tv).double()   # torchvision's own autograd in float64: the gradients' truth
    g = torch.Generator().manual_seed(3)
    sizes = [(15, 19), (8, 10), (4, 5)]
    feats = OrderedDict((f"c{i}", make_input((2, c, *hw), torch.float32, DEVICE, "channels_last", generator=g))
                        for i, (c, hw) in enumerate(zip(in_channels, sizes)))
    ref = tv(feats)                                     # fp32 eager: the float32 nearest rule
    low = OrderedDict((k, v.to(dtype).requires_grad_(True)) for k, v in feats.items())
    out = ours.to(dtype)(low)
    eager_low = tv.to(dtype)(OrderedDict((k, v.to(dtype)) for k, v in feats.items()))
    assert list(out) == list(ref)
    for name in ref:
        assert_close_to_reference(out[name], ref[name].detach(), dtype,
                                  eager_low[name])
    dys = {k: torch.randn(o.shape, generator=g).to(DEVICE) for k, o in out.items()}
    sum((o.float() * dys[k]).sum() for k, o in out.items()).backward()
    feats64 = OrderedDict((k, v.detach().double().requires_grad_(True)) for k, v in feats.items())
    out64 = tv64(feats64)
    sum((o * dys[k].double()).sum() for k, o in out64.items()).backward()
    atol, rtol = TOLERANCES[dtype]
    named = [(f"x[{k}]", low[k].grad, feats64[k].grad) for k in feats]
    named += [(f"{name}.grad", p.grad, p64.grad) for (name, p), p64 in zip(ours.named_parameters(), tv64.parameters())]
    for name, got, want in named:
        assert got is not None and got.dtype == dtype and got.shape == want.shape, name
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=atol * scale, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def _no_gpu_no_interpreter_run(before: str, after: str):
    """The lines a fresh process without TRITON_INTERPRET prints: it imports fused_fpn (and its
    backends as fb), runs ``before``, prints ``fused_fpn.available_backends()`` and
    ``fb.unavailable_reason('triton')``, then runs ``after``."""
    if HAS_CUDA:
        pytest.skip("checks the no-GPU path")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import os, sys, torch, fused_fpn\n"
            "from fused_fpn import backends as fb\n"
            + before
            + "print(fused_fpn.available_backends())\n"
            "print(fb.unavailable_reason('triton'))\n"
            + after)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()


def test_import_is_lazy():
    """Without a GPU and without TRITON_INTERPRET the backend reports why it is unavailable and
    never imports the kernels (nor triton through them)."""
    lines = _no_gpu_no_interpreter_run("", "print('fused_fpn.kernels.lateral_kernels' in sys.modules)\n")
    assert "triton" not in lines[0]
    assert "no CUDA device" in lines[1] and "TRITON_INTERPRET" in lines[1]
    assert lines[2] == "False"


def test_interpreter_switched_on_after_import_is_named_not_taken():
    """triton reads TRITON_INTERPRET when it is imported: set later, the interpreter cannot run the
    kernels, so the backend stays unavailable, with a reason that says so, and a call names it."""
    lines = _no_gpu_no_interpreter_run(
        "os.environ['TRITON_INTERPRET'] = '1'\n",
        "try:\n"
        "    fused_fpn.lateral(torch.ones(1, 2, 3, 3), torch.ones(4, 2), backend='triton')\n"
        "except ValueError as exc:\n"
        "    print('ValueError', exc)\n")
    assert "triton" not in lines[0]
    assert "TRITON_INTERPRET=1 was set after fused_fpn was imported" in lines[1]
    assert lines[2].startswith("ValueError fused_fpn backend 'triton' cannot run") and "was set after" in lines[2]


def test_registered_ops_reject_bad_input():
    """The ops validate their own arguments (they can be called without fused_fpn.lateral)."""
    from fused_fpn.backends import triton as tb
    fwd, bwd = tb.ops()
    x, weight, bias, top = _inputs("up_odd", torch.float32, "nchw")
    with pytest.raises(ValueError, match="weight"):
        fwd(x, weight[:, :5], bias, top)
    with pytest.raises(ValueError, match="weight"):
        fwd(x, weight[:, :, None, None], bias, top)
    with pytest.raises(ValueError, match="bias"):
        fwd(x, weight, bias[:3], top)
    with pytest.raises(ValueError, match="top"):
        fwd(x, weight, bias, top[:1])
    with pytest.raises(TypeError, match="top"):
        fwd(x, weight, bias, top.half())
    with pytest.raises(ValueError, match="x"):
        fwd(x.double(), weight.double(), None, None)
    grad = torch.randn((2, 33, 7, 9), device=DEVICE)
    with pytest.raises(ValueError, match="grad"):
        bwd(grad[:, :5], x, weight, 4, 5, True, True, True, True)
    with pytest.raises(ValueError, match="top_h"):
        bwd(grad, x, weight, 4, 0, True, True, True, True)
    with pytest.raises(TypeError, match=r"grad must be a dense \(torch.strided\) tensor, got layout torch.sparse_coo"):
        bwd(grad.to_sparse(), x, weight, 4, 5, True, True, True, True)
    with pytest.raises(TypeError, match=r"grad must have x's dtype and device \(torch.float32, .*\), got torch.float16"):
        bwd(grad.half(), x, weight, 4, 5, True, True, True, True)
    with pytest.raises(TypeError, match=rf"grad must have x's dtype and device \(torch.float32, {x.device}\), got "
                                        rf"torch.float32, meta"):
        bwd(grad.to("meta"), x, weight, 4, 5, True, True, True, True)


def test_bias_top_gradient_past_one_launch_is_a_clear_error():
    """The bias / top gradient runs N * top_h * ceil(top_w / BLOCK_TW) * ceil(C / BLOCK_C) programs in a
    1-D grid (its channel blocks were the grid's y axis, at most 65535 on a GPU, until 2026-12-02).
    Past 2^31 - 1 programs: a ValueError naming grad and the top, raised before dtop is allocated."""
    from fused_fpn.backends import triton as tb
    _, bwd = tb.ops()
    c = 2**22   # 65536 channel blocks of 64, times 65536 top rows: 2^32 programs
    x = torch.randn((1, 1, 1, 1), device=DEVICE)
    weight = torch.zeros((c, 1), device=DEVICE)
    grad = torch.zeros((1, 1, 1, 1), device=DEVICE).expand(1, c, 1, 1)
    with pytest.raises(ValueError, match=r"grad \(1, 4194304, 1, 1\) with a top of 65536 x 1: .* programs "
                                         r"\(N \* 65536 \* ceil\(1 / .* more than one launch takes \(2147483647\)"):
        bwd(grad, x, weight, 2**16, 1, False, False, True, True)


def test_autotune_key_is_the_pixel_bucket_and_the_layout_bits():
    """The autotuners key on (TUNE_KEY, COUT, CIN): M enters only through its power-of-two bucket
    (every M in (2^(k-1), 2^k] gives one key), and each layout bit gives another key."""
    from fused_fpn.kernels import lateral_kernels as K
    assert K.FWD_AUTOTUNE_KEY == K.GRAD_WEIGHT_AUTOTUNE_KEY == ["TUNE_KEY", "COUT", "CIN"]
    assert K._lateral_fwd_kernel.arg_names.count("TUNE_KEY") == 1
    assert K._lateral_grad_weight_kernel.arg_names.count("TUNE_KEY") == 1
    for k in range(5, 28):
        keys = {K.tune_key(m, True, True, True) for m in (2 ** (k - 1) + 1, 3 * 2 ** (k - 2), 2 ** k)}
        assert len(keys) == 1, (k, keys)
        assert K.tune_key(2 ** k + 1, True, True, True) != keys.pop()
    assert len({K.tune_key(m) for m in range(0, 17)}) == 1          # tiny M: one bucket
    bits = {K.tune_key(5000, a, b, c) for a in (False, True) for b in (False, True) for c in (False, True)}
    assert len(bits) == 8
    with pytest.raises(ValueError, match="at most 3 layout bits"):
        K.tune_key(5000, True, True, True, True)


def test_autotuning_can_be_switched_off(monkeypatch):
    """FUSED_FPN_TRITON_AUTOTUNE=0 (read at each launch): every kernel runs the first config of its
    list through a one-config autotuner (triton then neither benchmarks nor compiles the others);
    the default autotunes over the whole list; one autotuner object per list, reused."""
    from fused_fpn.kernels import lateral_kernels as K
    monkeypatch.delenv(K.AUTOTUNE_ENV, raising=False)
    assert K.autotune_enabled()
    keys = {(a, k) for a in ("sm90", "sm80") for k in K.KINDS}
    assert set(K.FWD_CONFIGS) == set(K.GRAD_WEIGHT_CONFIGS) == keys
    assert set(K.NARROW_FWD_CONFIGS) == set(K.NARROW_GRAD_WEIGHT_CONFIGS) == keys
    for arch, kind in K.FWD_CONFIGS:
        assert K.autotuned_fwd(arch, kind).configs == K.FWD_CONFIGS[(arch, kind)]
        assert K.autotuned_fwd(arch, kind) is K.autotuned_fwd(arch, kind)
        assert K.autotuned_grad_weight(arch, kind).configs == K.GRAD_WEIGHT_CONFIGS[(arch, kind)]
        assert K.autotuned_fwd(arch, kind, narrow=True).configs == K.NARROW_FWD_CONFIGS[(arch, kind)]
        assert K.autotuned_fwd(arch, kind, narrow=True) is K.autotuned_fwd(arch, kind, narrow=True)
        assert K.autotuned_fwd(arch, kind, narrow=True) is not K.autotuned_fwd(arch, kind)
        assert K.autotuned_grad_weight(arch, kind, narrow=True).configs == K.NARROW_GRAD_WEIGHT_CONFIGS[(arch, kind)]
    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv(K.AUTOTUNE_ENV, off)
        assert not K.autotune_enabled()
        for arch, kind in K.FWD_CONFIGS:
            assert K.autotuned_fwd(arch, kind).configs == K.FWD_CONFIGS[(arch, kind)][:1]
            assert K.autotuned_grad_weight(arch, kind).configs == K.GRAD_WEIGHT_CONFIGS[(arch, kind)][:1]
            assert K.autotuned_fwd(arch, kind, narrow=True).configs == K.NARROW_FWD_CONFIGS[(arch, kind)][:1]
            assert K.autotuned_grad_weight(arch, kind, True).configs == K.NARROW_GRAD_WEIGHT_CONFIGS[(arch, kind)][:1]
    monkeypatch.setenv(K.AUTOTUNE_ENV, "1")
    assert len(K.autotuned_fwd("sm90", "16bit").configs) == len(K.FWD_CONFIGS[("sm90", "16bit")]) > 1


def test_autotuned_launches_reuse_the_chosen_config_without_the_autotuner(monkeypatch):
    """The launcher's eager fast path (lateral_launch._launch_autotuned): the first launch of a key goes
    through triton's Autotuner.run, which tunes; later launches of that key run the JIT function
    itself with the config the autotuner chose (same kwargs, same result). A new key goes through the
    autotuner again, and so does every call with FAST_LAUNCH off or while torch.compile traces the
    op (wrap_triton returns a wrapper, which must get the autotuner). A tuned key launched with new
    constexpr flags, or on another device, goes through the autotuner (a new binary, or one not loaded
    there) but does not compile all its configs again (the autotuner does not benchmark a key it has
    tuned); inside a CUDA-graph capture it raises. Runs the compiled-kernel branch: on an interpreted
    kernel here, on a compiled one on a GPU."""
    import triton
    import triton.language as tl

    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L

    @triton.jit
    def _scale(src, dst, n, factor, BLOCK: tl.constexpr, SHIFT: tl.constexpr = 0):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask) * factor + SHIFT, mask=mask)

    timings = iter([])

    def do_bench(fn, quantiles=None, **_):   # the second config benchmarked wins each tuning
        fn()
        t = next(timings)
        return [t, t, t] if quantiles else t

    tuner = triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32}, num_warps=2)],
                            key=["n"], do_bench=do_bench)(_scale)
    calls = {"autotuner": 0, "jit": [], "precompile": 0, "warmups": 0}
    autotuner_run, jit_run = tuner.run, tuner.fn.run

    def spy_autotuner(*args, **kwargs):
        calls["autotuner"] += 1
        return autotuner_run(*args, **kwargs)

    loaded = {"binary": True}   # what a compile-only run (warmup=True) finds: a loaded binary or not

    def spy_jit(*args, **kwargs):
        if kwargs.get("warmup"):   # (the interpreter compiles nothing: a GPU's JIT returns the binary)
            calls["warmups"] += 1
            return SimpleNamespace(module=object() if loaded["binary"] else None)
        calls["jit"].append({k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
        return jit_run(*args, **kwargs)

    monkeypatch.setattr(tuner, "run", spy_autotuner)
    monkeypatch.setattr(tuner.fn, "run", spy_jit)
    monkeypatch.setattr(L, "interpreting", lambda: False)   # the compiled-kernel branch
    monkeypatch.setattr(L, "_CHOSEN", {})
    monkeypatch.setattr(L, "_TUNED", set())
    monkeypatch.setattr(L, "_TUNED_KEYS", set())
    device = {"index": -1}
    monkeypatch.setattr(L, "_device_index", lambda: device["index"])

    compile_in_parallel = L.compile_configs_in_parallel

    def spy_precompile(*args):   # here it compiles nothing (interpreted kernels): it returns False
        calls["precompile"] += 1
        return compile_in_parallel(*args)

    monkeypatch.setattr(L, "compile_configs_in_parallel", spy_precompile)

    def launch(n, expect_autotuner, expect_precompile=None, shift=0, key=None):
        """Launch (SHIFT=shift if given); the autotuner runs iff ``expect_autotuner``, and the configs are
        compiled on threads before it iff ``expect_precompile`` (default: as the autotuner)."""
        nonlocal timings
        timings = iter([2.0, 1.0])
        before, calls["jit"], precompiled = calls["autotuner"], [], calls["precompile"]
        src = torch.arange(n, dtype=torch.float32, device=DEVICE)
        dst = torch.full((n,), float("nan"), device=DEVICE)
        meta = {"SHIFT": shift} if shift else {}
        # as the op's body launches (outside it wrap_triton wraps the autotuner, with torch 2.11 and 2.14
        # alike, and the fast path never runs; torch 2.11 even fails on an autotuner of interpreted kernels)
        with L.as_in_the_op_body():
            L._launch_autotuned(tuner, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), (src, dst, n, 2.0), meta,
                                key or (n,))
        assert torch.equal(dst, 2.0 * src + shift)
        assert calls["autotuner"] - before == int(expect_autotuner)
        expect = expect_autotuner if expect_precompile is None else expect_precompile
        assert calls["precompile"] - precompiled == int(expect)
        return calls["jit"][-1]   # the kwargs of the launch that wrote dst

    winner = {"BLOCK": 32, "num_warps": 2}
    first = launch(40, expect_autotuner=True)             # tunes: BLOCK 32 wins
    assert {k: first[k] for k in winner} == winner
    again = launch(40, expect_autotuner=False)            # fast path: the JIT function, the same config
    assert again == first and len(calls["jit"]) == 1
    launch(100, expect_autotuner=True)                    # a new key tunes
    launch(100, expect_autotuner=False)
    monkeypatch.setattr(L, "FAST_LAUNCH", False)
    launch(40, expect_autotuner=True, expect_precompile=False)   # switched off: Autotuner.run every call
    monkeypatch.setattr(L, "FAST_LAUNCH", True)
    # new constexpr flags for a tuned key: the autotuner launches its choice (a new binary), no tuning
    # and no compiling of every config; then the fast path for those flags too
    shifted = launch(40, expect_autotuner=True, expect_precompile=False, shift=3)
    assert {k: shifted[k] for k in winner} == winner
    launch(40, expect_autotuner=False, shift=3)
    # a second GPU: a key launched on device 0 (here -1) is not loaded on device 1, so the first call
    # there goes through the autotuner (its cached choice: nothing tuned or compiled again) and inside
    # a capture raises; later calls there take the fast path
    key30 = (K.tune_key(30, True, True, True), 8, 4, torch.float32)
    launch(30, expect_autotuner=True, key=key30)
    device["index"] = 1
    monkeypatch.setattr(L, "_capturing", lambda: True)
    for fast_launch in (True, False):
        monkeypatch.setattr(L, "FAST_LAUNCH", fast_launch)
        with L.as_in_the_op_body(), pytest.raises(RuntimeError, match="first call for this shape"):
            L._launch_autotuned(tuner, lambda meta: (3,), (torch.zeros(30), torch.zeros(30), 30, 2.0), {}, key30)
    monkeypatch.setattr(L, "FAST_LAUNCH", True)
    monkeypatch.setattr(L, "_capturing", lambda: False)
    on_device_1 = launch(30, expect_autotuner=True, expect_precompile=False, key=key30)
    assert {k: on_device_1[k] for k in winner} == winner
    launch(30, expect_autotuner=False, key=key30)
    device["index"] = -1

    # inside a CUDA-graph capture: a key launched before runs as before (fast path, or the autotuner's
    # cached choice with FAST_LAUNCH off); a new key raises before anything is tuned or launched
    monkeypatch.setattr(L, "_capturing", lambda: True)
    launch(40, expect_autotuner=False)
    monkeypatch.setattr(L, "FAST_LAUNCH", False)
    launch(40, expect_autotuner=True, expect_precompile=False)
    monkeypatch.setattr(L, "FAST_LAUNCH", True)
    before, calls["jit"], precompiled = calls["autotuner"], [], calls["precompile"]
    src, dst = torch.arange(70, dtype=torch.float32, device=DEVICE), torch.zeros(70, device=DEVICE)
    key = (K.tune_key(70, True, True, True), 8, 4, torch.float32)
    message = r"first call for this shape \(fwd Cout=8 Cin=4 M<=128 x=cl out=cl float32\) is inside a CUDA-graph"
    with L.as_in_the_op_body(), pytest.raises(RuntimeError, match=message):
        L._launch_autotuned(tuner, lambda meta: (triton.cdiv(70, meta["BLOCK"]),), (src, dst, 70, 2.0), {}, key)
    assert calls["autotuner"] == before and calls["jit"] == [] and not dst.any(), "nothing tuned or launched"
    assert calls["precompile"] == precompiled, "nothing compiled"
    # the same for a fixed-config kernel, and for a launch of a tuned key with other constexpr flags
    with monkeypatch.context() as m, pytest.raises(RuntimeError, match=r"first call for this shape \(_scale\)"):
        # wrap_triton as in the op's body on a GPU (torch 2.11 refuses an interpreted plain kernel)
        m.setattr(torch.library, "wrap_triton", lambda kernel: kernel)
        L._launch(_scale, (5,), (src, dst, 70, 2.0), {"BLOCK": 16})
    monkeypatch.setattr(L, "_capturing", lambda: False)
    timings = iter([2.0, 1.0])
    grid40, args40 = (lambda meta: (triton.cdiv(40, meta["BLOCK"]),)), (src, torch.zeros(70, device=DEVICE), 40, 2.0)
    with L.as_in_the_op_body():   # before the capture: key40 tuned with no flags
        L._launch_autotuned(tuner, grid40, args40, {}, key)
    monkeypatch.setattr(L, "_capturing", lambda: True)
    for fast_launch in (True, False):   # the fast path too: a chosen config per key and flag set
        monkeypatch.setattr(L, "FAST_LAUNCH", fast_launch)
        with L.as_in_the_op_body(), pytest.raises(RuntimeError, match="first call for this shape"):
            L._launch_autotuned(tuner, grid40, (src, dst, 40, 2.0), {"EXTRA_FLAG": True}, key)
    monkeypatch.setattr(L, "FAST_LAUNCH", True)
    assert not dst.any()
    # a launch made before whose binary is not loaded (triton specializes on sizes, strides and pointer
    # alignment): raises inside a capture, autotuned (fast path or not) and fixed-config alike
    loaded["binary"] = False
    unloaded = "needs a kernel binary that no call before the capture loaded"
    for fast_launch in (True, False):
        monkeypatch.setattr(L, "FAST_LAUNCH", fast_launch)
        warmups = calls["warmups"]
        with L.as_in_the_op_body(), pytest.raises(RuntimeError, match=unloaded):
            L._launch_autotuned(tuner, grid40, (src, dst, 40, 2.0), {}, key)
        assert calls["warmups"] == warmups + 1
    monkeypatch.setattr(L, "FAST_LAUNCH", True)
    with monkeypatch.context() as m:
        m.setattr(torch.library, "wrap_triton", lambda kernel: kernel)
        m.setattr(L, "_capturing", lambda: False)
        L._launch(_scale, (5,), (src, dst, 70, 2.0), {"BLOCK": 16})   # before the capture
        dst.zero_()
        with pytest.raises(RuntimeError, match=r"this call \(_scale\) is inside a CUDA-graph capture and " + unloaded):
            m.setattr(L, "_capturing", lambda: True)
            L._launch(_scale, (5,), (src, dst, 70, 2.0), {"BLOCK": 16})
        loaded["binary"] = True   # loaded: the captured calls run
        L._launch(_scale, (5,), (src, dst, 70, 2.0), {"BLOCK": 16})
        assert torch.equal(dst, 2.0 * src)
    dst.zero_()
    with L.as_in_the_op_body():
        L._launch_autotuned(tuner, grid40, (src, dst, 40, 2.0), {}, key)
    assert torch.equal(dst[:40], 2.0 * src[:40]) and not dst[40:].any()
    monkeypatch.setattr(L, "_capturing", lambda: False)

    wrapped = []

    class TracingWrapper:   # what wrap_triton returns while torch.compile traces the op
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            wrapped.append(self.kernel)
            return self.kernel[grid]

    monkeypatch.setattr(torch.library, "wrap_triton", TracingWrapper)
    launch(40, expect_autotuner=True, expect_precompile=False)   # a known key, but traced: the autotuner
    assert wrapped == [tuner]


def test_compile_threads_follow_the_variable(monkeypatch):
    """How many threads compile a new key's configs (``lateral_launch.compile_threads``): the CPUs this
    process may use, or FUSED_FPN_TRITON_COMPILE_THREADS, never more than the configs; anything but a
    whole number is a ValueError naming the variable. ``compile_configs_in_parallel`` leaves an
    interpreted kernel to the autotuner (False; nothing to compile), and so it does, with a
    RuntimeWarning naming the error, when its step fails otherwise. The compiles themselves:
    tests/test_triton_aot.py."""
    import triton

    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    monkeypatch.delenv(L.COMPILE_THREADS_ENV, raising=False)
    cpus = len(os.sched_getaffinity(0))
    assert L.compile_threads(100) == cpus and L.compile_threads(1) == 1
    for value, threads in (("4", 4), (" 3 ", 3), ("0", 0), ("1", 1), ("64", 10)):
        monkeypatch.setenv(L.COMPILE_THREADS_ENV, value)
        assert L.compile_threads(10) == threads
    for value in ("-1", "2.5", "many"):
        monkeypatch.setenv(L.COMPILE_THREADS_ENV, value)
        with pytest.raises(ValueError, match=f"{L.COMPILE_THREADS_ENV} must be a whole number of threads"):
            L.compile_threads(10)
    monkeypatch.setenv(L.COMPILE_THREADS_ENV, "4")
    if L.interpreting():   # on a GPU the kernels are compiled ones (test_autotuned_launches_reuse_... compiles)
        tuner = triton.autotune(configs=K.fwd_configs("sm90", "16bit"), key=K.FWD_AUTOTUNE_KEY)(K._lateral_fwd_kernel)
        assert L.compile_configs_in_parallel(tuner, (1,), (), {}) is False

    # a compile step that fails for another reason (say, another triton's API) warns and leaves the
    # compiles to the autotuner, with no async-compile mode left active
    from triton.runtime import JITFunction
    from triton.runtime._async_compile import active_mode

    def kernel(x):
        pass

    class DriftedTuner:
        configs = [triton.Config({}), triton.Config({}, num_warps=8)]
        fn = JITFunction(kernel)

        def warmup(self, *args, **kwargs):
            raise TypeError("warmup() got an unexpected keyword argument 'grid'")

    with pytest.warns(RuntimeWarning, match="compiling the Triton configs of a new shape on 2 threads failed "
                                            r"\(TypeError: warmup\(\) got an unexpected keyword"):
        assert L.compile_configs_in_parallel(DriftedTuner(), (1,), (), {}) is False
    assert active_mode.get() is None


def _compiled_branch_on_the_interpreter(monkeypatch, sms, arch="sm90"):
    """Make the launchers take their compiled-kernel branch on CPU tensors (the interpreter runs the
    kernels): an ``arch`` device with ``sms`` multiprocessors, autotuning off (the autotuner times with
    CUDA events), an empty table of chosen configs, and ``wrap_triton`` returning the kernel itself, as
    it does in the registered op's eager body on a GPU (torch 2.14 also returns an interpreted kernel
    as it is; torch 2.11 refuses one: "wrap_triton only works on functions annotated with triton.jit")."""
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: kernel)
    monkeypatch.setattr(L, "interpreting", lambda: False)
    monkeypatch.setattr(L, "_device_facts", lambda device: (arch, sms))
    monkeypatch.setattr(L, "_CHOSEN", {})
    monkeypatch.setenv(K.AUTOTUNE_ENV, "0")


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the whole suite runs this launch path for real")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("arch,sms", [("sm90", 132), ("sm80", 108)])
def test_the_gpu_launch_path_on_interpreted_kernels(arch, sms, dtype, layout, monkeypatch):
    """The launchers' compiled-kernel branch (autotuner lookup, its keys, the eager fast path, the
    GPU dW split, the db + dtop launch options) with the real kernels and the first config of each
    list of the arch (the NARROW_* lists in NCHW: H * W odd), run by the interpreter on CPU tensors,
    forward and all four gradients, twice (the second time through the fast path), against the
    float64 reference."""
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    from fused_fpn.reference import lateral_backward_reference
    _compiled_branch_on_the_interpreter(monkeypatch, sms=sms, arch=arch)
    g = torch.Generator().manual_seed(5)
    x = make_input((2, 19, 7, 9), dtype, "cpu", layout, g)
    # Cout = 203: the forward's 256-wide tile stores in column quarters (_fwd_epilogue_tile), and
    # 203 reaches into the fourth one, so every quarter and the tail are checked
    w = (torch.randn((203, 19), generator=g) / 4).to(dtype)
    b = torch.randn((203,), generator=g).to(dtype)
    top = make_input((2, 203, 4, 5), dtype, "cpu", layout, g)
    grad = make_input((2, 203, 7, 9), dtype, "cpu", layout, g)
    f64 = [t.double() for t in (x, w, b, top, grad)]
    y_ref = lateral_reference(*f64[:4])
    grads_ref = lateral_backward_reference(f64[4], f64[0], f64[1], (4, 5), (True,) * 4)
    recorded = []
    for attempt in ("autotuner", "fast path"):
        with L.recording_autotune_choices() as chosen:
            y = L.lateral_forward(x, w, b, top)
            got = L.lateral_backward(grad, x, w, 4, 5, True, True, True, True)
        recorded.append(chosen)
        assert_close_to_reference(y, y_ref, dtype)
        assert y.is_contiguous(memory_format=output_memory_format(x))
        atol, rtol = TOLERANCES[dtype]
        for name, g_got, g_ref in zip(("dx", "dW", "db", "dtop"), got, grads_ref):
            assert g_got.shape == g_ref.shape and g_got.dtype == dtype, name
            assert not torch.isnan(g_got).any(), f"{attempt}: {name} has NaN: an element was not written"
            scale = max(1.0, g_ref.abs().max().item())   # as test_backward_matches_reference
            torch.testing.assert_close(g_got.double(), g_ref, atol=atol * scale, rtol=rtol,
                                       msg=lambda m, name=name: f"{attempt}: {name}: {m}")
        assert got[0].is_contiguous(memory_format=output_memory_format(x)), "dx follows x's layout"
    kind = L.config_kind(x)
    narrow = layout == "nchw"   # H * W = 63: NCHW pixels load one element at a time (the NARROW_* lists)
    tuners = {K.autotuned_fwd(arch, kind, narrow), K.autotuned_grad_weight(arch, kind, narrow)}
    assert {t for t, *_ in L._CHOSEN} == tuners, "forward, dx and dW configs are remembered"
    assert len(L._CHOSEN) == 3
    # what the benchmarks record of each row: the same three choices through the autotuner and the
    # fast path, described in the layer's terms (M = 126 pixels: bucket 128)
    lay, dt = ("cl" if layout == "channels_last" else "nchw"), str(dtype).replace("torch.", "")
    dt += "" if kind == "16bit" else f" {kind}"   # fp32: this file runs with TF32 off (no_tf32): "ieee"
    dt += " narrow" if narrow else ""
    fwd, dw = K.fwd_configs(arch, kind, narrow=narrow)[0], K.grad_weight_configs(arch, kind, narrow)[0]
    assert recorded[0] == recorded[1] == {
        f"fwd Cout=203 Cin=19 M<=128 x={lay} out={lay} {dt}": L.describe_config(fwd.all_kwargs()),
        f"dx Cout=203 Cin=19 M<=128 dy={lay} dx={lay} {dt}": L.describe_config(fwd.all_kwargs()),
        f"dW Cout=203 Cin=19 M<=128 dy={lay} x={lay} {dt}": L.describe_config(dw.all_kwargs()),
    }
    assert L.describe_config(fwd.all_kwargs()).startswith(
        f"BLOCK_M={fwd.kwargs['BLOCK_M']} BLOCK_N={fwd.kwargs['BLOCK_N']} BLOCK_K={fwd.kwargs['BLOCK_K']} ")
    assert L.describe_config(fwd.all_kwargs()).endswith(f" num_warps={fwd.num_warps} num_stages={fwd.num_stages}")
    assert not L._RECORDERS, "a recording block leaves nothing behind"


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the whole suite runs this launch path for real")
def test_launch_plans_are_kept_per_tensor_geometry_and_device_facts(monkeypatch):
    """The compiled branch keeps what a launch derives from its tensors' sizes, strides and dtypes
    (the kernels' scalars and flags, grid, tuning key, narrow loads: ``lateral_launch.launch_plan``)
    per signature. Calls that differ only in a stride, a dtype, bias or top presence, the top's size,
    a weight's orientation, the TF32 switch or the device's facts each get a plan of their own and the
    float64 reference's numbers (NaN-poisoned outputs); the same calls again reuse their plans and
    give the same bits."""
    from fused_fpn.kernels import lateral_launch as L
    _compiled_branch_on_the_interpreter(monkeypatch, sms=132)
    monkeypatch.setattr(L, "_PLANS", {})
    g = torch.Generator().manual_seed(11)
    w = (torch.randn((6, 9), generator=g) / 4)
    wt = w.t().contiguous().t()   # the same [6, 9] values, Cin stride 6 (as dx passes W^T)
    b = torch.randn((6,), generator=g)
    top = make_input((2, 6, 3, 4), torch.float32, "cpu", "nchw", g)
    x = {layout: make_input((2, 9, 5, 7), torch.float32, "cpu", layout, g) for layout in LAYOUTS}
    top_cl = top.contiguous(memory_format=torch.channels_last)
    cases = {   # label -> (facts, tf32, x, w, b, top[, out's layout, FORCE_SCALE_IN_KERNEL])
        "nchw": (None, False, x["nchw"], w, b, top),
        "out channels_last": (None, False, x["nchw"], w, b, top, "channels_last"),
        "top channels_last": (None, False, x["nchw"], w, b, top_cl),
        "scales in kernel": (None, False, x["nchw"], w, b, top, "nchw", True),
        "114 SMs": (("sm90", 114), False, x["nchw"], w, b, top),
        "channels_last": (None, False, x["channels_last"], w, b, top),
        "noncontig": (None, False, x["noncontig"], w, b, top),
        "no bias": (None, False, x["nchw"], w, None, top),
        "no top": (None, False, x["nchw"], w, b, None),
        "top 5x7": (None, False, x["nchw"], w, b, make_input((2, 6, 5, 7), torch.float32, "cpu", "nchw", g)),
        "W Cin stride 6": (None, False, x["nchw"], wt, b, top),
        "fp16": (None, False, x["nchw"].half(), w.half(), b.half(), top.half()),
        "tf32": (None, True, x["nchw"], w, b, top),
        "sm80": (("sm80", 108), False, x["nchw"], w, b, top),
    }
    first = {}
    for attempt in ("new", "again"):
        for label, (facts, tf32, xi, wi, bi, ti, *more) in cases.items():
            out_layout, in_kernel = more + ["nchw", False][len(more):]
            monkeypatch.setattr(L, "_device_facts", lambda device, f=facts or ("sm90", 132): f)
            monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
            monkeypatch.setattr(L, "FORCE_SCALE_IN_KERNEL", in_kernel)
            out = make_input((2, 6, 5, 7), xi.dtype, "cpu", out_layout).fill_(float("nan"))
            L.gemm_epilogue(xi, wi, bi, ti, out)
            ref = lateral_reference(*(None if t is None else t.double() for t in (xi, wi, bi, ti)))
            assert_close_to_reference(out, ref, xi.dtype if not tf32 else torch.float16)   # TF32: 10-bit mantissa
            if attempt == "new":
                first[label] = out
            else:
                assert torch.equal(out, first[label]), f"{label}: another result through the kept plan"
        assert len(L._PLANS) == len(cases), f"{attempt}: one plan per signature"
        assert sum(plan.meta["SCALE_IN_KERNEL"] for plan in L._PLANS.values()) == 1   # "scales in kernel"'s
    # the weight gradient's plans: per geometry, dtype, TF32 switch and device facts too
    grad = make_input((2, 6, 5, 7), torch.float32, "cpu", "nchw", g)
    monkeypatch.setattr(L, "FORCE_SCALE_IN_KERNEL", False)
    dw_cases = [(layout, torch.float32, False, ("sm90", 132)) for layout in LAYOUTS]
    dw_cases += [("nchw", torch.float16, False, ("sm90", 132)), ("nchw", torch.float32, True, ("sm90", 132)),
                 ("nchw", torch.float32, False, ("sm90", 8)), ("nchw", torch.float32, False, ("sm80", 108))]
    for layout, dtype, tf32, facts in dw_cases * 2:
        monkeypatch.setattr(L, "_device_facts", lambda device, f=facts: f)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
        xi, gi = x[layout].to(dtype), grad.to(dtype)
        dw = L.grad_weight(gi, xi, dtype)
        ref = torch.einsum("nohw,nihw->oi", gi.double(), xi.double())
        assert_close_to_reference(dw, ref, dtype if not tf32 else torch.float16)
    assert len(L._PLANS) == len(cases) + len(dw_cases)


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU tests/test_triton_gpu.py runs each list with its TF32 setting")
def test_fp32_takes_the_config_lists_of_the_tf32_flag(monkeypatch):
    """fp32 launches tune over the "tf32" lists when torch.backends.cudnn.allow_tf32 is on and over the
    "ieee" lists (tiles an FMA dot holds without spilling) when it is off, each with an autotuner of its
    own: triton's autotuner key has the dtypes but not ALLOW_TF32, so one shared autotuner would reuse a
    config chosen for TF32 in exact fp32. Through the launchers' compiled-kernel branch on the
    interpreter, forward and dW, flag off, on, then off again (the fast path of the first choices)."""
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    _compiled_branch_on_the_interpreter(monkeypatch, sms=132)
    assert K.operand_kind(2, True) == K.operand_kind(2, False) == "16bit"
    assert (K.operand_kind(4, True), K.operand_kind(4, False)) == ("tf32", "ieee")
    g = torch.Generator().manual_seed(6)
    x = make_input((1, 12, 5, 6), torch.float32, "cpu", "channels_last", g)
    w, b = torch.randn((20, 12), generator=g) / 4, torch.randn((20,), generator=g)
    y_ref = lateral_reference(x.double(), w.double(), b.double(), None)
    recorded, flags = {}, []
    launch = L._launch_autotuned

    def flag_recording_launch(tuner, grid, args, meta, *rest):   # the kernels' own TF32 flag
        flags.append((tuner.fused_fpn_name, meta["ALLOW_TF32"]))
        return launch(tuner, grid, args, meta, *rest)

    monkeypatch.setattr(L, "_launch_autotuned", flag_recording_launch)
    for tf32 in (False, True, False):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
        flags.clear()
        with L.recording_autotune_choices() as chosen:
            assert_close_to_reference(L.lateral_forward(x, w, b, None), y_ref, torch.float32)
            L.grad_weight(torch.ones((1, 20, 5, 6)).to(memory_format=torch.channels_last), x, torch.float32)
        assert flags == [("fwd", tf32), ("dw", tf32)]   # (the interpreter's dot ignores it: no value shows it)
        kind = "tf32" if tf32 else "ieee"
        assert chosen == {
            f"fwd Cout=20 Cin=12 M<=32 x=cl out=cl float32 {kind}":
                L.describe_config(K.FWD_CONFIGS[("sm90", kind)][0].all_kwargs()),
            f"dW Cout=20 Cin=12 M<=32 dy=cl x=cl float32 {kind}":
                L.describe_config(K.GRAD_WEIGHT_CONFIGS[("sm90", kind)][0].all_kwargs()),
        }
        recorded.setdefault(kind, chosen)
        assert chosen == recorded[kind]
    assert {(t.fused_fpn_name, t.fused_fpn_kind) for t, *_ in L._CHOSEN} == \
        {("fwd", "ieee"), ("dw", "ieee"), ("fwd", "tf32"), ("dw", "tf32")}
    assert K.FWD_CONFIGS[("sm90", "ieee")][0].all_kwargs() != K.FWD_CONFIGS[("sm90", "tf32")][0].all_kwargs()


@pytest.mark.skipif(getattr(torch.backends.cudnn, "conv", None) is None, reason="torch < 2.9: one legacy TF32 switch")
def test_tf32_switch_is_read_as_eager_conv_reads_it():
    """The Triton launchers take TF32 for fp32 exactly when eager conv2d may (fused_fpn._precision:
    torch.backends.cudnn.conv.fp32_precision, resolved through its parents), whichever API set it.
    After the per-op API sets conv alone, the legacy getter torch.backends.cudnn.allow_tf32 raises
    (conv and RNN differ), so reading it would fail every fp32 Triton call."""
    from fused_fpn._precision import conv_allows_tf32
    from fused_fpn.kernels import lateral_launch as L
    get, put = torch._C._get_fp32_precision_getter, torch._C._set_fp32_precision_setter
    slots = [("cuda", "conv"), ("cuda", "rnn"), ("cuda", "all"), ("generic", "all")]
    saved = [get(*slot) for slot in slots]
    x = torch.zeros((1, 4, 2, 2))
    try:
        for legacy in (False, True):   # ends on torch's default, TF32 on
            torch.backends.cudnn.allow_tf32 = legacy
            assert conv_allows_tf32() is legacy
            assert L.config_kind(x) == ("tf32" if legacy else "ieee")
        torch.backends.cudnn.conv.fp32_precision = "ieee"   # the per-op API, from the default
        with pytest.raises(RuntimeError, match="different TF32 flags"):
            torch.backends.cudnn.allow_tf32
        assert conv_allows_tf32() is False and L.config_kind(x) == "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        assert conv_allows_tf32() is True and L.config_kind(x) == "tf32"
        torch.backends.cudnn.conv.fp32_precision = "none"     # inherits: cuDNN's, then the global setting
        torch.backends.fp32_precision = "tf32"
        assert conv_allows_tf32() is True
        torch.backends.fp32_precision = "ieee"
        assert conv_allows_tf32() is False
        assert L.config_kind(x.half()) == "16bit"
    finally:
        for slot, value in zip(slots, saved):
            put(*slot, value)
    assert [get(*slot) for slot in slots] == saved


def test_host_cdiv_is_tritons():
    """The launchers' host-side ceil division gives triton.cdiv's results (it replaces that call)."""
    import triton
    from fused_fpn.kernels import lateral_launch as L
    for a in list(range(0, 70)) + [2**31 - 1, 2**31, 2**40 + 3]:
        for b in (1, 2, 3, 16, 64, 256, 1024):
            assert L.cdiv(a, b) == triton.cdiv(a, b), (a, b)


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU tests/test_triton_gpu.py runs every persistent config itself")
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
def test_persistent_forward_walks_every_tile(layout, monkeypatch):
    """The forward kernel's PERSISTENT path (experimental configs): 3 programs walk all the output
    tiles (tile, tile + 3, ...), through the launcher's compiled-kernel branch on the interpreter with
    a small persistent config; forward with bias and top, and dx = dy . W^T, against the reference."""
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    from fused_fpn.reference import lateral_backward_reference
    small = K._cfg(16, 16, 16, 4, 2, group_m=2, persistent=True)
    _compiled_branch_on_the_interpreter(monkeypatch, sms=3)   # 3 "SMs": 3 programs
    monkeypatch.setitem(K.FWD_CONFIGS, ("sm90", "ieee"), [small])   # fp32 with TF32 off (no_tf32)
    monkeypatch.setitem(K.NARROW_FWD_CONFIGS, ("sm90", "ieee"), [small])   # NCHW, H * W = 63: this list
    g = torch.Generator().manual_seed(9)
    x = make_input((2, 19, 7, 9), torch.float32, "cpu", layout, g)     # M = 126: 8 row tiles x 3 column tiles
    w = torch.randn((37, 19), generator=g) / 4
    b = torch.randn((37,), generator=g)
    top = make_input((2, 37, 4, 5), torch.float32, "cpu", layout, g)
    grad = make_input((2, 37, 7, 9), torch.float32, "cpu", layout, g)
    f64 = [t.double() for t in (x, w, b, top, grad)]
    for _ in range(2):   # the autotuner's launch, then the fast path
        assert_close_to_reference(L.lateral_forward(x, w, b, top), lateral_reference(*f64[:4]), torch.float32)
        dx = L.lateral_backward(grad, x, w, 4, 5, True, False, False, False)[0]
        dx_ref = lateral_backward_reference(f64[4], f64[0], f64[1], (4, 5), (True, False, False, False))[0]
        assert_close_to_reference(dx, dx_ref, torch.float32)
    assert all(kw["PERSISTENT"] for kw in L._CHOSEN.values()) and len(L._CHOSEN) == 2
    # Cin == 0 (out = bias + top): the loop still takes one (masked) K step per tile, then its epilogue
    x0 = make_input((2, 0, 7, 9), torch.float32, "cpu", layout, g)
    w0 = torch.empty((37, 0))
    out = torch.full((2, 37, 7, 9), float("nan")).contiguous(memory_format=output_memory_format(x0))
    L.gemm_epilogue(x0, w0, b, top, out)
    assert_close_to_reference(out, lateral_reference(x0.double(), w0.double(), f64[2], f64[3]), torch.float32)


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU tests/test_triton_gpu.py runs every weight-stationary config itself")
@pytest.mark.parametrize("view", ["dense", "sliced"])
def test_resident_weight_forward_walks_every_row_tile(view, monkeypatch):
    """The forward kernel's RESIDENT_W path (experimental weight-stationary configs): 6 programs, two
    per column tile (Cout 37 in tiles of 16), each keeping its weight tile and walking every other
    row tile, through the launcher's compiled-kernel branch on the interpreter, which offers a
    channels_last x the list of the smallest BLOCK_K >= its channels (the forward's Cin 19: 32; dx's
    reduction over dy's 37 channels: 64). Forward with bias and top into a NaN-poisoned output (x
    dense, and a sliced view whose pixels do not flatten), and dx = dy . W^T, against the reference."""
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    from fused_fpn.reference import lateral_backward_reference
    small = [K._cfg(16, 16, bk, 4, 2, resident=True) for bk in (16, 32, 64)]
    _compiled_branch_on_the_interpreter(monkeypatch, sms=7)   # 7 "SMs": 6 programs (a multiple of 3)
    monkeypatch.setenv(K.EXPERIMENTAL_ENV, "1")
    monkeypatch.setitem(K.FWD_CONFIGS, ("sm90", "ieee"), [])   # fp32 with TF32 off (no_tf32): this list
    monkeypatch.setitem(K.RESIDENT_FWD_CONFIGS, ("sm90", "ieee"), small)
    g = torch.Generator().manual_seed(11)
    x = make_input((2, 19, 7, 9 if view == "dense" else 12), torch.float32, "cpu", "channels_last", g)
    if view == "sliced":
        x = x[..., 1:10]
        assert not L.pixels_flatten(x)
    w = torch.randn((37, 19), generator=g) / 4
    b = torch.randn((37,), generator=g)
    top = make_input((2, 37, 4, 5), torch.float32, "cpu", "channels_last", g)
    grad = make_input((2, 37, 7, 9), torch.float32, "cpu", "channels_last", g)
    f64 = [t.double() for t in (x, w, b, top, grad)]
    assert L.resident_reduction(x) == 19 and L.resident_reduction(x.contiguous()) == 0   # NCHW: none
    for _ in range(2):   # the autotuner's launch, then the fast path
        out = torch.full((2, 37, 7, 9), float("nan")).contiguous(memory_format=torch.channels_last)
        assert_close_to_reference(L.gemm_epilogue(x, w, b, top, out), lateral_reference(*f64[:4]), torch.float32)
        dx = L.lateral_backward(grad, x, w, 4, 5, True, False, False, False)[0]
        dx_ref = lateral_backward_reference(f64[4], f64[0], f64[1], (4, 5), (True, False, False, False))[0]
        assert_close_to_reference(dx, dx_ref, torch.float32)
    assert sorted(kw["BLOCK_K"] for kw in L._CHOSEN.values()) == [32, 64]
    assert all(kw["RESIDENT_W"] for kw in L._CHOSEN.values())
    # a resident config given a reduction past its BLOCK_K is refused, never run on part of the channels
    plan = L._fwd_plan(x, w, b, top, out, 7)
    with pytest.raises(ValueError, match="RESIDENT_W config needs Cin <= BLOCK_K, got Cin 19"):
        plan.grid(dict(small[0].kwargs))
    assert plan.grid(dict(small[1].kwargs)) == (6,)


def test_resident_weight_lists_and_grid():
    """``resident_fwd_configs`` gives the configs of the smallest BLOCK_K >= K (none past the largest,
    none for K = 0); ``resident_grid`` gives one program per SM rounded down to a multiple of the
    column tiles, at least one per column tile, at most one per tile. The sm_90 fp16/bf16 list has
    BLOCK_K 128 and 256 (ResNet-50-FPN's P2: Cin 256), and no other list has such configs."""
    from fused_fpn.kernels import lateral_kernels as K
    table = K.RESIDENT_FWD_CONFIGS[("sm90", "16bit")]
    assert all(c.kwargs["RESIDENT_W"] and not c.kwargs["PERSISTENT"] and not c.kwargs["TMA"] for c in table)
    assert set(K.RESIDENT_FWD_CONFIGS) == {("sm90", "16bit")}
    by_k = {k: K.resident_fwd_configs("sm90", "16bit", k) for k in (0, 1, 72, 128, 129, 256, 257, 2048)}
    assert by_k[0] == [] and by_k[257] == [] and by_k[2048] == []
    assert by_k[1] == by_k[72] == by_k[128] == [c for c in table if c.kwargs["BLOCK_K"] == 128] != []
    assert by_k[129] == by_k[256] == [c for c in table if c.kwargs["BLOCK_K"] == 256] != []
    assert K.resident_fwd_configs("sm80", "16bit", 256) == K.resident_fwd_configs("sm90", "tf32", 256) == []
    assert K.resident_grid(24, 3, 7) == 6 and K.resident_grid(3, 3, 132) == 3 and K.resident_grid(3, 3, 2) == 3
    assert K.resident_grid(950, 1, 132) == 132 and K.resident_grid(1900, 2, 132) == 132
    assert K.resident_grid(238, 2, 133) == 132 and K.resident_grid(60, 2, 132) == 60


class _ReplayedBinary:
    """A stand-in for the compiled binary triton's JIT returns: its ``run`` (the binary's launcher, as
    ``JITFunction.run`` calls it) records the call and runs the interpreted kernel ``jit_run`` with the
    grid and the arguments it was given, every parameter positionally (constexprs too)."""

    def __init__(self, jit_run, runs):
        self.jit_run, self.runs = jit_run, runs
        self.function, self.packed_metadata = object(), object()

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid, stream)

    def run(self, grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
        assert (function, packed_metadata) == (self.function, self.packed_metadata)
        self.runs.append(dict(grid=(grid_0, grid_1, grid_2), stream=stream, metadata=launch_metadata,
                              hooks=(enter, exit_)))
        self.jit_run(*args, grid=(grid_0, grid_1, grid_2), warmup=False)


def _replaying_jit(monkeypatch, kernels, loaded=None):
    """Spy on each JIT function of ``kernels``: a launch runs the interpreted kernel and returns a
    ``_ReplayedBinary`` of it (as a GPU's JIT returns the binary it launched); a compile-only run
    (warmup=True, made inside a capture) returns a binary that is loaded or not as ``loaded["binary"]``
    says. Returns (the JIT launches' kwargs, the replayed binaries' runs)."""
    from triton.runtime.autotuner import Autotuner
    jit_calls, runs = [], []
    for kernel in kernels:
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        jit_run = fn.run

        def spy(*args, _jit_run=jit_run, **kwargs):
            if kwargs.get("warmup"):
                assert loaded is not None, "no compile-only run outside a capture"
                return SimpleNamespace(module=object() if loaded["binary"] else None)
            jit_calls.append({k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
            _jit_run(*args, **kwargs)
            return _ReplayedBinary(_jit_run, runs)
        monkeypatch.setattr(fn, "run", spy)
    return jit_calls, runs


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU tests/test_triton_gpu.py runs the binary launches for real")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_experimental_binary_launches_run_the_binary_the_jit_returned(dtype, layout, monkeypatch):
    """FUSED_FPN_TRITON_EXPERIMENTAL=1: a launch made before runs the binary triton's JIT returned for
    it (lateral_launch._launch_binary), with the same arguments in the kernel's signature order
    (constexprs and defaults included), grid, stream and launch hooks as JITFunction.run passes. The
    real kernels on the compiled branch, each JIT launch returning a binary that replays the
    interpreted kernel: forward and all four gradients, three times (the autotuner, the fast path's
    first launch of each binary key through the JIT, then the binaries), bit for bit the same and
    against the float64 reference."""
    from triton import knobs

    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    from fused_fpn.reference import lateral_backward_reference
    _compiled_branch_on_the_interpreter(monkeypatch, sms=132)
    monkeypatch.setenv(K.EXPERIMENTAL_ENV, "1")
    for table in ("_TUNED", "_TUNED_KEYS", "_BINARY_LAUNCHES"):
        monkeypatch.setattr(L, table, type(getattr(L, table))())
    monkeypatch.setattr(L, "_current_stream", lambda device: ("stream of device", device))

    def enter_hook(metadata):   # triton's launch hooks reach the binary as the JIT passes them
        pass
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", enter_hook)
    g = torch.Generator().manual_seed(6)
    x = make_input((2, 19, 7, 9), dtype, "cpu", layout, g)
    w, b = (torch.randn((40, 19), generator=g) / 4).to(dtype), torch.randn((40,), generator=g).to(dtype)
    top = make_input((2, 40, 4, 5), dtype, "cpu", layout, g)
    grad = make_input((2, 40, 7, 9), dtype, "cpu", layout, g)
    kind, narrow = L.config_kind(x), layout == "nchw"   # (the switch's longer lists start alike: no tuning)
    kernels = [K.autotuned_fwd("sm90", kind, narrow), K.autotuned_grad_weight("sm90", kind, narrow),
               K._lateral_grad_bias_top_kernel]
    jit_calls, runs = _replaying_jit(monkeypatch, kernels)
    results = []
    for attempt in ("autotuner", "JIT, binary kept", "binary"):
        jit_calls.clear(), runs.clear()
        with L.as_in_the_op_body():
            results.append((L.lateral_forward(x, w, b, top),)
                           + L.lateral_backward(grad, x, w, 4, 5, True, True, True, True))
        if attempt == "binary":
            assert jit_calls == [] and len(runs) == 4, "forward, dx, dW and db + dtop: each its binary"
        else:
            assert runs == [] and len(jit_calls) == 4
    assert {r["stream"] for r in runs} == {("stream of device", -1)}
    # the launch metadata gets the grid as the grid function gave it (the JIT's), the launcher 3 ints
    assert all(r["hooks"] == (enter_hook, knobs.runtime.launch_exit_hook) and r["metadata"][2] == r["stream"]
               and L._grid3(r["metadata"][1]) == r["grid"] for r in runs)
    fwd_config = K.fwd_configs("sm90", kind, narrow=narrow)[0].kwargs
    m = 2 * 7 * 9
    assert runs[0]["grid"] == (L.cdiv(m, fwd_config["BLOCK_M"]) * L.cdiv(40, fwd_config["BLOCK_N"]), 1, 1)
    for got in results[1:]:
        for name, a, e in zip(("y", "dx", "dW", "db", "dtop"), got, results[0]):
            assert torch.equal(a, e) and a.stride() == e.stride(), name
    f64 = [t.double() for t in (x, w, b, top, grad)]
    assert_close_to_reference(results[2][0], lateral_reference(*f64[:4]), dtype)
    atol, rtol = TOLERANCES[dtype]
    for got, ref in zip(results[2][1:], lateral_backward_reference(f64[4], f64[0], f64[1], (4, 5), (True,) * 4)):
        torch.testing.assert_close(got.double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=rtol)
    # off: the JIT at every launch
    monkeypatch.setenv(K.EXPERIMENTAL_ENV, "0")
    jit_calls.clear(), runs.clear()
    with L.as_in_the_op_body():
        y = L.lateral_forward(x, w, b, top)
    assert torch.equal(y, results[0][0]) and len(jit_calls) == 1 and runs == []


def test_binary_key_holds_what_triton_specializes_on():
    """lateral_launch.binary_key: equal for launches triton would give one binary, different where it
    specializes: a tensor's dtype or 16-byte alignment, a scalar's value, or its type at equal value."""
    from fused_fpn.kernels import lateral_launch as L
    base = torch.zeros(16)
    key = L.binary_key((base, base, 7, 0.5, True), 2)
    assert key == L.binary_key((torch.ones(16), base[:8], 7, 0.5, True), 2)   # other aligned data
    assert key != L.binary_key((base, base[1:], 7, 0.5, True), 2)             # 4 bytes off
    assert key != L.binary_key((base, base.double(), 7, 0.5, True), 2)
    assert key != L.binary_key((base, base, 8, 0.5, True), 2)
    assert key != L.binary_key((base, base, 7, 0.5, 1), 2)                   # True == 1, another type
    assert key != L.binary_key((base, base, 7.0, 0.5, True), 2)


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU tests/test_triton_gpu.py runs the binary launches for real")
def test_binary_launch_takes_the_jit_for_each_new_binary_key(monkeypatch):
    """lateral_launch._launch_binary on a small kernel: a binary key not seen before (another size, a
    misaligned tensor) goes through the JIT, whose binary then serves that key with that key's grid;
    another chosen config for the launch rebuilds its constexprs (its BLOCK) instead of launching the
    old ones; a parameter left to its default reaches the binary with the default's value; a JIT
    function given a pre-run hook takes the JIT at every call; inside a CUDA-graph capture a known
    binary launches and a new binary key whose binary is not loaded raises before anything runs."""
    import triton
    import triton.language as tl

    from fused_fpn.kernels import lateral_launch as L

    @triton.jit
    def _affine(src, dst, n, factor, BLOCK: tl.constexpr, SHIFT: tl.constexpr = 5):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask) * factor + SHIFT, mask=mask)

    loaded = {"binary": True}
    jit_calls, runs = _replaying_jit(monkeypatch, [_affine], loaded)
    monkeypatch.setattr(L, "_BINARY_LAUNCHES", {})
    monkeypatch.setattr(L, "_current_stream", lambda device: 0)
    capturing = {"now": False}
    monkeypatch.setattr(L, "_capturing", lambda: capturing["now"])
    src = torch.arange(64, dtype=torch.float32)
    seen = ("a launch", ((), -1))

    def launch(n, offset=0, chosen=None, expect_jit=False):
        jit_calls.clear(), runs.clear()
        dst = torch.full((64,), float("nan"))
        L._launch_binary(_affine, lambda meta: (L.cdiv(n, meta["BLOCK"]),), (src[offset:], dst, n, 2.0), {},
                         seen, lambda: "_affine", chosen or first)
        assert torch.equal(dst[:n], 2.0 * src[offset:offset + n] + 5) and dst[n:].isnan().all()
        assert (len(jit_calls), len(runs)) == ((1, 0) if expect_jit else (0, 1))
        return (jit_calls or runs)[0]

    first = {"BLOCK": 16}
    assert launch(40, expect_jit=True) == {"BLOCK": 16}
    assert launch(40)["grid"] == (3, 1, 1)
    launch(50, expect_jit=True)   # another n: another binary key, with its own grid
    assert launch(50)["grid"] == (4, 1, 1) and launch(40)["grid"] == (3, 1, 1)
    launch(40, offset=1, expect_jit=True)   # src 4 bytes off 16: triton's alignment specialization
    launch(40, offset=1)
    launch(40, offset=4)   # 16 bytes off: aligned, the first binary
    other = {"BLOCK": 32}   # the autotuner's choice replaced (a new dict): not the old BLOCK's binaries
    assert launch(40, chosen=other, expect_jit=True) == {"BLOCK": 32}
    assert launch(40, chosen=other)["grid"] == (2, 1, 1)
    # inside a capture: a known binary launches; a new binary key that is not loaded raises, unlaunched
    capturing["now"] = True
    launch(40, chosen=other)
    loaded["binary"] = False
    dst = torch.zeros(64)
    with pytest.raises(RuntimeError, match="needs a kernel binary that no call before the capture loaded"):
        L._launch_binary(_affine, lambda meta: (L.cdiv(45, meta["BLOCK"]),), (src, dst, 45, 2.0), {}, seen,
                         lambda: "_affine", other)
    assert not dst.any()
    capturing["now"], loaded["binary"] = False, True
    # a pre-run hook (triton runs it at each JIT call): the JIT at every call, hook and all
    hooked = []
    monkeypatch.setattr(_affine, "pre_run_hooks", [lambda *args, **kwargs: hooked.append(args[2])])
    launch(40, chosen=other, expect_jit=True)
    launch(40, chosen=other, expect_jit=True)
    assert hooked == [40, 40]

def test_experimental_configs_are_opt_in(monkeypatch):
    """FUSED_FPN_TRITON_EXPERIMENTAL=1 adds the persistent forward configs to the autotuner's list
    (sm_90, fp16/bf16), the TMA ones (sm_90, fp16/bf16 and TF32) where the launch's operands allow
    them, and the weight-stationary ones (sm_90, fp16/bf16) for a reduction that fits one of their
    K blocks; without it the list is FWD_CONFIGS alone."""
    from fused_fpn.kernels import lateral_kernels as K
    monkeypatch.delenv(K.EXPERIMENTAL_ENV, raising=False)
    monkeypatch.delenv(K.AUTOTUNE_ENV, raising=False)
    assert not K.experimental_enabled()
    assert K.autotuned_fwd("sm90", "16bit").configs == K.FWD_CONFIGS[("sm90", "16bit")]
    assert not any(c.kwargs["PERSISTENT"] for configs in K.FWD_CONFIGS.values() for c in configs)
    monkeypatch.setenv(K.EXPERIMENTAL_ENV, "1")
    assert K.experimental_enabled()
    extra = K.EXPERIMENTAL_FWD_CONFIGS[("sm90", "16bit")]
    assert K.autotuned_fwd("sm90", "16bit").configs == K.FWD_CONFIGS[("sm90", "16bit")] + extra
    assert all(c.kwargs["PERSISTENT"] for c in extra)
    assert K.autotuned_fwd("sm80", "16bit").configs == K.FWD_CONFIGS[("sm80", "16bit")]   # sm90 only
    assert K.autotuned_fwd("sm90", "tf32").configs == K.FWD_CONFIGS[("sm90", "tf32")]     # fp16/bf16 only
    # not for NCHW pixels loaded one at a time: the persistent tiles are 128 x 256 / 64 x 256 ones
    assert K.autotuned_fwd("sm90", "16bit", narrow=True).configs == K.NARROW_FWD_CONFIGS[("sm90", "16bit")]
    # the TMA configs: only where the launch's operands allow them (tma), sm_90, fp16/bf16 and TF32
    tma = K.TMA_FWD_CONFIGS[("sm90", "16bit")]
    assert all(c.kwargs["TMA"] for c in tma) and not any(c.kwargs["TMA"] for c in extra)
    tuner = K.autotuned_fwd("sm90", "16bit", tma=True)
    assert tuner.configs == K.FWD_CONFIGS[("sm90", "16bit")] + extra + tma and tuner.fused_fpn_tma
    assert not K.autotuned_fwd("sm90", "16bit").fused_fpn_tma
    assert K.autotuned_fwd("sm90", "tf32", tma=True).configs == K.FWD_CONFIGS[("sm90", "tf32")] + \
        K.TMA_FWD_CONFIGS[("sm90", "tf32")]
    assert K.autotuned_fwd("sm90", "ieee", tma=True).configs == K.FWD_CONFIGS[("sm90", "ieee")]
    assert K.autotuned_fwd("sm80", "16bit", tma=True).configs == K.FWD_CONFIGS[("sm80", "16bit")]
    assert K.autotuned_fwd("sm90", "16bit", narrow=True, tma=True).configs == K.NARROW_FWD_CONFIGS[("sm90", "16bit")]
    assert not any(c.kwargs["TMA"] for table in (K.FWD_CONFIGS, K.NARROW_FWD_CONFIGS)
                   for configs in table.values() for c in configs)
    # the weight-stationary configs: for the launch's reduction size, where the launcher offers them
    resident = K.resident_fwd_configs("sm90", "16bit", 256)
    assert resident and all(c.kwargs["RESIDENT_W"] for c in resident)
    default = K.FWD_CONFIGS[("sm90", "16bit")]
    assert K.autotuned_fwd("sm90", "16bit", resident_k=256).configs == default + extra + resident
    assert K.autotuned_fwd("sm90", "16bit", tma=True, resident_k=256).configs == default + extra + tma + resident
    assert K.autotuned_fwd("sm90", "16bit", resident_k=512).configs == default + extra
    assert K.autotuned_fwd("sm90", "16bit", narrow=True, resident_k=256).configs == \
        K.NARROW_FWD_CONFIGS[("sm90", "16bit")]
    others = (K.FWD_CONFIGS, K.NARROW_FWD_CONFIGS, K.EXPERIMENTAL_FWD_CONFIGS, K.TMA_FWD_CONFIGS)
    assert not any(c.kwargs["RESIDENT_W"] for table in others for configs in table.values() for c in configs)
    monkeypatch.delenv(K.EXPERIMENTAL_ENV)
    tuner = K.autotuned_fwd("sm90", "16bit", tma=True)
    assert tuner.configs == K.FWD_CONFIGS[("sm90", "16bit")] and not tuner.fused_fpn_tma
    assert K.autotuned_fwd("sm90", "16bit", resident_k=256).configs == default


def test_forward_autotuner_is_kept_until_a_list_is_replaced(monkeypatch):
    """``autotuned_fwd`` keeps its answer per arguments and switches: a second call returns the same
    autotuner without joining its config list again, a table entry replaced since (as tests replace
    them) gives the autotuner of the new list, the old entry back gives the first autotuner again,
    and autotuning off gives the list's first config alone."""
    from fused_fpn.kernels import lateral_kernels as K
    monkeypatch.setenv(K.EXPERIMENTAL_ENV, "1")
    monkeypatch.delenv(K.AUTOTUNE_ENV, raising=False)
    key, args = ("sm90", "16bit"), dict(tma=True, resident_k=256)
    first = K.autotuned_fwd(*key, **args)
    assert first.configs == K.fwd_configs(*key, experimental=True, **args)
    joined, fwd_configs = [], K.fwd_configs
    monkeypatch.setattr(K, "fwd_configs", lambda *a, **kw: joined.append(a) or fwd_configs(*a, **kw))
    assert K.autotuned_fwd(*key, **args) is first and joined == []
    for table in (K.FWD_CONFIGS, K.EXPERIMENTAL_FWD_CONFIGS, K.TMA_FWD_CONFIGS, K.RESIDENT_FWD_CONFIGS):
        with monkeypatch.context() as m:
            m.setitem(table, key, table[key][1:])   # a new list: one config fewer
            tuner = K.autotuned_fwd(*key, **args)
            assert tuner.configs == fwd_configs(*key, experimental=True, **args)
            assert len(tuner.configs) == len(first.configs) - 1
        assert K.autotuned_fwd(*key, **args) is first
    # the switch on and off keep an autotuner each (calls alternating between them join no list)
    off, on = K.autotuned_fwd(*key, experimental=False), K.autotuned_fwd(*key, experimental=True)
    joined.clear()
    for _ in range(3):
        assert K.autotuned_fwd(*key, experimental=False) is off and K.autotuned_fwd(*key, experimental=True) is on
    assert joined == [] and off.configs == K.FWD_CONFIGS[key] != on.configs
    monkeypatch.setenv(K.AUTOTUNE_ENV, "0")
    assert K.autotuned_fwd(*key, **args).configs == first.configs[:1]


def test_tma_offer_reads_the_base_addresses_at_every_launch(monkeypatch):
    """The forward's launch plan keeps whether its operands' sizes and strides allow TMA loads, and the
    launch still reads their base addresses: tensors of one geometry, 16-byte aligned then 2 bytes off
    then aligned again, are offered the TMA list, not offered it, offered it (one plan for all three)."""
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    _compiled_branch_on_the_interpreter(monkeypatch, sms=132)
    monkeypatch.setenv(K.EXPERIMENTAL_ENV, "1")
    monkeypatch.setattr(L, "_PLANS", {})
    offered, autotuned_fwd = [], K.autotuned_fwd
    monkeypatch.setattr(K, "autotuned_fwd", lambda arch, kind, narrow, tma, *rest: offered.append(tma) or
                        autotuned_fwd(arch, kind, narrow, tma, *rest))
    monkeypatch.setattr(L, "_launch_autotuned", lambda *args: None)   # nothing runs
    flat = torch.empty(2 * 24 * 35 + 8, dtype=torch.float16)

    def x_at(offset):   # channels_last [2, 24, 5, 7], ``offset`` elements into ``flat``
        return flat[offset:offset + 2 * 24 * 35].view(2, 5, 7, 24).permute(0, 3, 1, 2)
    w = torch.randn(8, 24).to(torch.float16)
    for offset in (8, 1, 8):
        x = x_at(offset)
        assert (x.data_ptr() % 16 == 0) == (offset == 8) and x.stride() == (840, 1, 168, 24)
        L.gemm_epilogue(x, w, None, None, torch.empty(2, 8, 5, 7, dtype=torch.float16))
    assert offered == [True, False, True] and len(L._PLANS) == 1


def test_backward_reads_the_experimental_switch_once(monkeypatch):
    """``lateral_backward`` reads FUSED_FPN_TRITON_EXPERIMENTAL once and hands it to its three launches
    (dx, dW, db + dtop): each launches its binary with the switch on, through the JIT with it off or
    with lateral_launch.BINARY_LAUNCH off."""
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    _compiled_branch_on_the_interpreter(monkeypatch, sms=132)
    binaries, reads = [], []
    monkeypatch.setattr(L, "_launch", lambda kernel, grid, args, meta, binary=False: binaries.append(binary))
    monkeypatch.setattr(L, "_launch_autotuned",
                        lambda tuner, grid, args, meta, key, binary=False: binaries.append(binary))
    enabled = K.experimental_enabled
    monkeypatch.setattr(K, "experimental_enabled", lambda: reads.append(1) or enabled())
    g = torch.Generator().manual_seed(3)
    x = make_input((2, 19, 7, 9), torch.float16, "cpu", "channels_last", g)
    w = torch.randn((40, 19), generator=g).to(torch.float16)
    grad = make_input((2, 40, 7, 9), torch.float16, "cpu", "channels_last", g)
    for switch, binary_launch, want in (("1", True, True), ("0", True, False), ("1", False, False)):
        monkeypatch.setenv(K.EXPERIMENTAL_ENV, switch)
        monkeypatch.setattr(L, "BINARY_LAUNCH", binary_launch)
        binaries.clear(), reads.clear()
        L.lateral_backward(grad, x, w, 4, 5, True, True, True, True)
        assert binaries == [want] * 3 and len(reads) == 1


def test_launchers_keep_symbolic_sizes_symbolic(monkeypatch):
    """While torch.compile (dynamic shapes) or torch.export (Dims) traces the triton ops, their bodies
    see symbolic N, H, W and top sizes: what the launchers compute from them (kernel arguments,
    grids, allocations, the dW split) must keep them symbolic. The nearest scales (float(H)), the
    autotune key's bucket (bit_length of N*H*W) and the backward's search depths once pinned every
    one of them to its traced value: a recompile per image size under torch.compile, an error under
    torch.export with dynamic dims; the kernels now compute them (SCALE_IN_KERNEL). The launches are
    recorded, not run (fake tensors), through the compiled-kernel branch (a GPU's) with a stand-in
    SM count. (On a GPU, tests/test_training_and_compilers.py runs the registered ops this way.)"""
    from fused_fpn.backends import triton as tb
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    launches, tuners = [], []
    monkeypatch.setenv(K.EXPERIMENTAL_ENV, "1")   # the switch's rules read sizes too
    tma_rule, tma = L.tma_geometry, []
    monkeypatch.setattr(L, "tma_geometry", lambda inp, weight: tma.append(tma_rule(inp, weight)) or tma[-1])
    monkeypatch.setattr(L, "interpreting", lambda: False)
    monkeypatch.setattr(L, "_device_facts", lambda device: ("sm90", 132))
    monkeypatch.setattr(L, "_launch",
                        lambda kernel, grid, args, meta, binary=False: launches.append((grid, args, meta)))

    def autotuned(tuner, grid, args, meta, key, binary=False):
        launches.append((grid, args, meta))
        tuners.append((layout, tuner.fused_fpn_name, tuner.fused_fpn_narrow))
    monkeypatch.setattr(L, "_launch_autotuned", autotuned)
    monkeypatch.setattr(L, "_PLANS", {})
    sym = SymbolicSizes()
    for layout in ["nchw", "channels_last", "noncontig"]:   # traced at the first shapes; the others: guards
        x = sym.tensor(make_input((2, 8, 40, 44), torch.float32, DEVICE, layout), (0, 2, 3),
                       make_input((3, 8, 37, 29), torch.float32, DEVICE, layout))
        top = sym.tensor(make_input((2, 4, 20, 22), torch.float32, DEVICE, layout), (0, 2, 3),
                         make_input((3, 4, 19, 15), torch.float32, DEVICE, layout))
        weight, bias = sym.tensor(torch.randn(4, 8, device=DEVICE)), sym.tensor(torch.randn(4, device=DEVICE))
        assert all(isinstance(s, torch.SymInt) for s in (x.shape[0], *x.shape[2:], *top.shape[2:]))
        with sym.mode:
            tb.check_forward_args(x, weight, bias, top)
            out = L.lateral_forward(x, weight, bias, top)
            grad = torch.empty_like(out)
            tb.check_backward_args(grad, x, weight, top.shape[2], top.shape[3])
            grads = L.lateral_backward(grad, x, weight, top.shape[2], top.shape[3], True, True, True, True)
        assert tuple(out.shape) == (x.shape[0], 4, x.shape[2], x.shape[3])
        assert tuple(grads[3].shape) == tuple(top.shape)
    for grid, args, meta in launches:   # the grids too (inductor evaluates them per config)
        if callable(grid):
            for persistent in (False, True):
                grid(dict(BLOCK_M=128, BLOCK_N=256, PERSISTENT=persistent))
        if "SCALE_IN_KERNEL" in meta:   # forward, dx, db + dtop: the kernels compute the scales
            assert meta["SCALE_IN_KERNEL"] and not any(isinstance(a, float) and a != 0.0 for a in args)
        # symbolic sizes are not known multiples (40 x 44 is one of 16; 37 x 29 is odd): no alignment, no guard
        assert meta.get("PIX_ALIGN", 1) == 1
    assert len(launches) == 3 * 4   # per layout: forward, dx, dW, db + dtop
    # NCHW pixels of unknown alignment, and the noncontig view's (2 apart), load one element at a
    # time: the narrow lists
    assert tuners == [(layout, name, layout != "channels_last") for layout in ["nchw", "channels_last", "noncontig"]
                      for name in ("fwd", "fwd", "dw")]
    # the TMA rule's sizes-and-strides part, asked as each forward and dx plan is built: never in a
    # trace (the compiled code's tensors may be aligned otherwise), so no size is read and nothing guarded
    assert tma == [False] * 6
    assert not L._PLANS, "a trace's tensors (symbolic sizes) never enter the eager launch plans"
    sym.assert_none_pinned()


def test_pixel_alignment_takes_the_largest_power_of_two_that_divides_every_operand():
    """PIX_ALIGN (what the kernels may assume a multiple of: ``_pixel_aligned``) is the largest power
    of two up to 16 bytes of elements dividing every value; symbolic values count only where the
    trace proves it without a guard."""
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    hw = 50 * 76   # ResNet-50-FPN's P4 at 800 x 1216: 3800 = 8 * 475, no multiple of 16
    assert K.pixel_alignment(2, hw, 1024 * hw, hw, 256 * hw, hw) == 8
    assert K.pixel_alignment(4, hw, 1024 * hw, hw, 256 * hw, hw) == 4   # 16 bytes of fp32
    assert K.pixel_alignment(2, 25 * 38, 2048 * 950, 950) == 2          # P5: 950 = 2 * 475
    assert K.pixel_alignment(2, 25 * 25, 625) == 1
    assert K.pixel_alignment(2, hw, 1024 * hw, 1) == 1                  # channels_last: channel stride 1
    assert K.pixel_alignment(2, hw, 0) == 8                             # a stride 0 (expanded) divides
    assert K.pixel_alignment(2, 200 * 304, 256 * 200 * 304, 0) == 1     # P2: triton's own hint (16) is stronger
    assert K.pixel_alignment(2, hw, 1024 * hw, whole_vectors=True) == 8  # the weight gradient's: 16 bytes or 1
    assert K.pixel_alignment(2, 950, 2048 * 950, whole_vectors=True) == 1
    sym = SymbolicSizes()   # traced at 64 x 48 (a multiple of 16); 37 x 29 is odd
    x = sym.tensor(torch.empty(2, 256, 64, 48), (2, 3), torch.empty(2, 256, 37, 29))
    h, w = x.shape[2:]
    assert L.pixel_alignment(2, h * w, x.stride(0), x.stride(1)) == 1   # no guard on a size's divisibility
    assert L.pixel_alignment(2, 8 * h, 256 * h * w) == 8                # provable without a guard
    assert L.pixel_alignment(2, 16 * h, 256 * h * w) == 1               # ... and a multiple of 16: hinted
    sym.assert_none_pinned()


def test_pixels_loaded_one_at_a_time_take_the_narrow_config_lists():
    """A launch takes the NARROW_* config lists when it loads an operand whose channels are not
    contiguous (NCHW, views) one element at a time: its pixels are not contiguous (or its (h, w) do
    not flatten: per-pixel h, w offsets), or the kernel
    knows no alignment of their runs (neither triton's hint, H * W and the operand's batch and channel
    strides all multiples of 16, nor PIX_ALIGN > 1: H * W odd, symbolic sizes, or the weight
    gradient's runs short of 16 bytes, for which it takes no PIX_ALIGN). Those lists keep the
    accumulators and the per-element addresses within the registers (tests/test_triton_aot.py: no
    spills); channels_last operands never take them."""
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L

    def meta(kind, a, b):   # the launch's constexprs: forward of x = a into out = b, or dW of dy = a, x = b
        if kind == "fwd":
            return L.fwd_launch_args(a, torch.empty((b.shape[1], a.shape[1]), dtype=a.dtype), None, None, b)[1]
        n, cin, h, w = b.shape
        return dict(PIX_ALIGN=L.pixel_alignment(b.element_size(), h * w, *a.stride()[:2], *b.stride()[:2],
                                                whole_vectors=True))

    def narrow(kind, a, b):
        return L.narrow_pixel_loads((a,) if kind == "fwd" else (a, b), meta(kind, a, b)["PIX_ALIGN"])

    def t(shape, layout, dtype=torch.float16):
        return make_input(shape, dtype, "meta" if layout != "noncontig" else "cpu", layout)

    p5, p2 = (25, 38), (200, 304)
    assert not K.narrow_pixel_loads(2, 950, 2048 * 950, 950, 1)     # P5 forward: PIX_ALIGN 2
    assert K.narrow_pixel_loads(1, 950, 256 * 950, 950, 1)          # P5 weight gradient: none
    assert not K.narrow_pixel_loads(1, 60800, 256 * 60800, 60800, 1)   # P2: triton's hint
    assert not K.narrow_pixel_loads(1, 63, 19 * 63, 1, 19)           # channels_last
    assert K.narrow_pixel_loads(8, 63, 2 * 19 * 63, 2 * 63, 2)       # pixels 2 apart
    for kind in ("fwd", "dw"):
        for layout, want in (("nchw", True), ("channels_last", False), ("noncontig", True)):
            a, b = t((2, 19, 7, 9), layout), t((2, 8, 7, 9), layout)   # H * W = 63
            assert narrow(kind, a, b) == want, (kind, layout)
        # ResNet-50-FPN's P5 at 800 x 1216 in NCHW: the forward's runs 2 fp16 apart (PIX_ALIGN 2), the
        # weight gradient's not 16-byte aligned; P2: hinted
        assert narrow(kind, t((2, 2048, *p5), "nchw"), t((2, 256, *p5), "nchw")) == (kind == "dw")
        assert not narrow(kind, t((2, 256, *p2), "nchw"), t((2, 256, *p2), "nchw"))
        # a crop of NCHW (h, w do not flatten: per-pixel h, w offsets), though every size is hinted
        assert narrow(kind, t((2, 256, 8, 48), "nchw")[..., :32], t((2, 256, 8, 32), "nchw"))
        # mixed layouts at P2: the NCHW operand is hinted, though PIX_ALIGN is 1 (a unit channel stride)
        assert not narrow(kind, t((2, 256, *p2), "nchw"), t((2, 256, *p2), "channels_last"))
        assert not narrow(kind, t((2, 256, *p2), "channels_last"), t((2, 256, *p2), "nchw"))
    sym = SymbolicSizes()   # traced at 64 x 48 (a multiple of 16); 37 x 29 is odd
    x = sym.tensor(torch.empty(2, 256, 64, 48), (2, 3), torch.empty(2, 256, 37, 29))
    assert L.narrow_pixel_loads((x,), 1)   # nothing known: narrow, and no guard
    sym.assert_none_pinned()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("h, w", [(10, 76), (5, 38), (5, 5), (4, 6)])   # H * W = 760, 190, 25, 24
def test_nchw_pixel_alignment_reaches_the_kernels_and_keeps_the_results(h, w, layout, monkeypatch):
    """Forward, dx and dW of NCHW maps whose H * W is a multiple of 8, 2, 1 and 8 but not of 16 get
    PIX_ALIGN 4 (16 bytes of fp32), 2 (dW: 1, whole 16-byte vectors only), 1, 4 (channels_last: 1)
    and match the float64 reference: the kernels' (v // PIX_ALIGN) * PIX_ALIGN would change H * W or
    a stride the host over-claimed (the interpreter crashed on such a run: tried)."""
    from fused_fpn.kernels import lateral_launch as L
    metas = []
    for name in ("_launch", "_launch_autotuned"):
        original = getattr(L, name)

        def spy(kernel, grid, args, meta, *key, _original=original):
            metas.append(meta)
            return _original(kernel, grid, args, meta, *key)
        monkeypatch.setattr(L, name, spy)
    x, weight, bias, top = make_lateral_case(2, 5, 3, (h, w), (h // 2 + 1, w // 2), torch.float32, DEVICE, layout)
    out = torch.full((2, 3, h, w), float("nan"), device=DEVICE).contiguous(memory_format=output_memory_format(x))
    L.gemm_epilogue(x, weight, bias, top, out)
    grad = make_input((2, 3, h, w), torch.float32, DEVICE, layout)
    dx, dw, _, _ = L.lateral_backward(grad, x, weight, top.shape[2], top.shape[3], True, True, False, False)
    x64, w64, b64, t64 = to64(x, weight, bias, top)
    assert_close_to_reference(out, lateral_reference(x64, w64, b64, t64), torch.float32)
    assert_close_to_reference(dx, torch.einsum("nchw,cd->ndhw", grad.double(), w64), torch.float32)
    assert_close_to_reference(dw, torch.einsum("nchw,ndhw->cd", grad.double(), x64), torch.float32)
    want = {760: 4, 190: 2, 25: 1, 24: 4}[h * w] if layout == "nchw" else 1
    assert [m["PIX_ALIGN"] for m in metas] == [want, want, want if want == 4 else 1]   # forward, dx, dW


def test_tma_rule_takes_dense_channels_last_rows_and_aligned_bases():
    """The forward's x and W tiles may come through TMA descriptors (the experimental TMA configs)
    only where the copy engine reads them as [M, Cin] and [Cout, Cin] matrices: x channels_last with
    its pixels one row stride apart across the batch, rows that do not overlap, W Cin-contiguous (not
    dx's W^T), row strides that are multiples of 16 bytes and 16-byte aligned bases. Anything else
    would read other elements or fault on a GPU, so the launcher keeps the per-thread loads."""
    from fused_fpn.kernels import lateral_launch as L

    def x_of(shape, dtype=torch.float16, layout="channels_last"):
        return make_input(shape, dtype, "cpu", layout)

    w = torch.empty(256, 256, dtype=torch.float16)
    assert L.tma_loads(x_of((2, 256, 5, 7)), w)
    assert L.tma_loads(x_of((2, 256, 5, 7)), torch.nn.Parameter(w))   # a layer's weight as it is
    assert not L.tma_loads(x_of((2, 256, 5, 7), layout="nchw"), w)
    assert not L.tma_loads(x_of((2, 256, 5, 7)), w.t())                       # dx: W^T
    assert L.tma_loads(x_of((2, 24, 5, 7)), torch.empty(8, 24, dtype=torch.float16))       # 48-byte rows
    assert not L.tma_loads(x_of((2, 20, 5, 7)), torch.empty(8, 20, dtype=torch.float16))   # 40-byte rows
    assert L.tma_loads(x_of((2, 20, 5, 7), torch.float32), torch.empty(8, 20))               # 80-byte rows
    big = x_of((3, 256, 5, 7))
    assert L.tma_loads(big[1:], w)                       # a batch slice: rows still one stride apart
    assert L.tma_loads(x_of((2, 320, 5, 7))[:, :256], w)  # a channel slice: row stride 320 >= 256
    assert not L.tma_loads(x_of((2, 256, 5, 9))[..., :7], w)   # a crop: rows not evenly spaced
    assert not L.tma_loads(big[:, :, :, ::2], w)                # pixels 2 rows apart: not dense
    flat = torch.empty(2 * 256 * 35 + 1, dtype=torch.float16)   # a base 2 bytes off 16-byte alignment
    shifted = flat[1:].view(2, 5, 7, 256).permute(0, 3, 1, 2)
    assert shifted.stride(1) == 1 and shifted.data_ptr() % 16 != 0
    assert not L.tma_loads(shifted, w)
    w_flat = torch.empty(256 * 256 + 8, dtype=torch.float16)   # W 16 bytes in: aligned; 8 bytes in: not
    assert L.tma_loads(x_of((2, 256, 5, 7)), w_flat[8:].view(256, 256))
    assert not L.tma_loads(x_of((2, 256, 5, 7)), w_flat[4:-4].view(256, 256))
    assert not L.tma_loads(x_of((1, 256, 5, 7)).expand(2, 256, 5, 7), w)   # batch stride 0: rows repeat
    odd = torch.empty(4096, dtype=torch.float16).as_strided((1, 256, 1, 7), (3, 1, 5, 256))
    assert L.tma_loads(odd, w)          # N = H = 1: their strides (3, 5) never reach the descriptor
    assert not L.tma_loads(x_of((2, 256, 5, 7)), torch.empty(256, 1, dtype=torch.float16).expand(256, 256))
    # Cout == 1 still needs a 16-byte row stride in W's descriptor (fp16 [1, 20]: 40 bytes), and dx of a
    # layer with Cin == 1 (W^T [1, Cout], strides (1, 1)) is not offered the list
    x20 = x_of((2, 24, 5, 7))[:, :20]
    assert not L.tma_loads(x20, torch.empty(1, 20, dtype=torch.float16))
    assert L.tma_loads(x20, torch.empty(1, 24, dtype=torch.float16)[:, :20])   # row stride 24: 48 bytes
    assert not L.tma_loads(x_of((2, 64, 5, 7)), torch.empty(64, 1, dtype=torch.float16).t())
    # a trace (fake tensors) is never offered it: its tensors' alignment at run time is unknown
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        assert not L.tma_loads(mode.from_tensor(x_of((2, 256, 5, 7))), mode.from_tensor(w))


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU tests/test_triton_gpu.py runs every TMA config itself")
@pytest.mark.parametrize("persistent", [False, True], ids=["tiles", "persistent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_tma_forward_matches_the_reference(dtype, persistent, monkeypatch):
    """The forward kernel's TMA path (x and W tiles through device-built descriptors, zero-filled past
    M, Cin and Cout), through the launcher's compiled-kernel branch on the interpreter with
    FUSED_FPN_TRITON_EXPERIMENTAL=1 and a small TMA config as the only one: odd M (126 pixels, 32-row
    tiles), Cin = 40 (a 16-deep K tail), Cout = 37, with and without bias and top, on a batch slice
    (a base one image in) and on a channel slice (row stride 48 > Cin), into NaN-poisoned outputs,
    against the float64 reference."""
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    _compiled_branch_on_the_interpreter(monkeypatch, sms=3)
    allocator_calls = []
    monkeypatch.setattr(L, "ensure_scratch_allocator", lambda: allocator_calls.append(1))
    kind = L.config_kind(torch.empty(0, dtype=dtype))
    small = K._cfg(32, 16, 16, 4, 2, group_m=2, persistent=persistent, tma=True)
    only_tma_config(monkeypatch, ("sm90", kind), small)   # the TMA config alone (autotuning is off)
    g = torch.Generator().manual_seed(13)
    whole = make_input((3, 48, 7, 9), dtype, "cpu", "channels_last", g)
    w = (torch.randn((37, 40), generator=g) / 4).to(dtype)
    b = torch.randn((37,), generator=g).to(dtype)
    top = make_input((2, 37, 4, 5), dtype, "cpu", "channels_last", g)
    for x in (whole[1:, :40].contiguous(memory_format=torch.channels_last), whole[1:, :40]):
        assert L.tma_loads(x, w)
        for bias, t in ((b, top), (None, None)):
            out = torch.full((2, 37, 7, 9), float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last)
            with L.recording_autotune_choices() as chosen:
                L.gemm_epilogue(x, w, bias, t, out)
            assert_close_to_reference(out, lateral_reference(*to64(x, w, bias, t)), dtype)
            (what, config), = chosen.items()
            assert what.endswith(" tma") and "TMA=True" in config, chosen
    assert allocator_calls, "a TMA launch makes sure triton has a scratch allocator"
    # the descriptors' K step is what ran: without its products the result is bias + top alone (the
    # interpreter looks the kernel's helpers up in their module at each launch)
    from triton_probes import k_step_that_adds_nothing
    monkeypatch.setattr(K, "_fwd_k_step_tma", k_step_that_adds_nothing)
    out = torch.full((2, 37, 7, 9), float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last)
    L.gemm_epilogue(whole[1:, :40], w, b, top, out)
    zero = torch.zeros_like(whole[1:, :40])
    torch.testing.assert_close(out.double(), lateral_reference(*to64(zero, w, b, top)), atol=1e-2, rtol=1e-2)


def test_the_scratch_allocator_is_set_once_and_never_replaces_one():
    """``ensure_scratch_allocator``: in a thread whose triton has no allocator (the default, per
    thread: a context variable) it sets one that allocates through torch; a thread's own allocator
    (the user's, or inductor's) is kept."""
    import threading

    from triton.runtime import _allocation

    from fused_fpn.kernels import lateral_launch as L
    seen = {}

    def fresh():
        seen["before"] = _allocation._allocator.get()
        L.ensure_scratch_allocator()
        seen["after"] = _allocation._allocator.get()

    def own():
        mine = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8)   # noqa: E731
        triton_mod.set_allocator(mine)
        L.ensure_scratch_allocator()
        seen["own"] = (_allocation._allocator.get() is mine)

    import triton as triton_mod
    for target in (fresh, own):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert isinstance(seen["before"], _allocation.NullAllocator)
    assert seen["after"] is L._torch_scratch
    assert seen["own"]
