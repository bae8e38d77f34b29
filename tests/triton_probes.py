"""@triton.jit probes of the Triton kernels' device helpers, for tests (importing this imports triton:
import it inside a test, after conftest has set TRITON_INTERPRET where there is no GPU)."""
import triton
import triton.language as tl

from fused_fpn.kernels.lateral_kernels import _nearest_first_dst, _nearest_scale, _nearest_src, _search_steps


@triton.jit
def nearest_probe(dst_size_ptr, src_size_ptr, d_ptr, t_ptr, src_out, first_out, MAX_DST,
                  ROWS: tl.constexpr, COLS: tl.constexpr):
    """Rows r of (DST, SRC): src_out[r] = _nearest_src(d[r]) (the forward's gather index) and
    first_out[r] = _nearest_first_dst(t[r]) (the backward's preimage search), with the scale of
    ``_nearest_scale`` and the search depth of ``_search_steps(MAX_DST)`` (MAX_DST >= every DST), as
    the kernels compute them; d, t, outputs int32 [rows, COLS], contiguous. Program p takes rows
    [p * ROWS, (p + 1) * ROWS)."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = r[:, None] * COLS + tl.arange(0, COLS)[None, :]
    dst_size = tl.load(dst_size_ptr + r)[:, None]
    src_size = tl.load(src_size_ptr + r)[:, None]
    scale = _nearest_scale(src_size, dst_size)
    tl.store(src_out + offs, _nearest_src(tl.load(d_ptr + offs), scale, src_size))
    tl.store(first_out + offs, _nearest_first_dst(tl.load(t_ptr + offs), dst_size, src_size, scale,
                                                  _search_steps(MAX_DST)))


@triton.jit
def search_steps_probe(dst_ptr, out_ptr):
    """out[p] = _search_steps(dst[p]) (one scalar per program)."""
    p = tl.program_id(0)
    tl.store(out_ptr + p, _search_steps(tl.load(dst_ptr + p)))


@triton.jit
def k_step_that_adds_nothing(acc, k0, x_desc, w_desc, m0, n0, ALLOW_TF32: tl.constexpr,
                             USE_INPUT_PRECISION: tl.constexpr):
    """A stand-in for ``_fwd_k_step_tma`` that returns the accumulator unchanged: with it, a launch that
    runs the TMA path computes bias + top alone."""
    return acc
