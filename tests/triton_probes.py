"""@triton.jit probes of the Triton kernels' device helpers, for tests (importing this imports triton:
import it inside a test, after conftest has set TRITON_INTERPRET where there is no GPU)."""
import triton
import triton.language as tl

from fused_fpn.kernels.lateral_kernels import _nearest_first_dst, _nearest_src


@triton.jit
def nearest_probe(dst_size_ptr, src_size_ptr, scale_ptr, d_ptr, t_ptr, src_out, first_out, N_ITER,
                  ROWS: tl.constexpr, COLS: tl.constexpr):
    """Rows r of (DST, SRC, scale): src_out[r] = _nearest_src(d[r]) (the forward's gather index) and
    first_out[r] = _nearest_first_dst(t[r]) (the backward's preimage search); d, t, outputs int32
    [rows, COLS], contiguous. Program p takes rows [p * ROWS, (p + 1) * ROWS)."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = r[:, None] * COLS + tl.arange(0, COLS)[None, :]
    dst_size = tl.load(dst_size_ptr + r)[:, None]
    src_size = tl.load(src_size_ptr + r)[:, None]
    scale = tl.load(scale_ptr + r)[:, None]
    tl.store(src_out + offs, _nearest_src(tl.load(d_ptr + offs), scale, src_size))
    tl.store(first_out + offs, _nearest_first_dst(tl.load(t_ptr + offs), dst_size, src_size, scale, N_ITER))
