"""Triton kernels of the fused lateral op (raw ``@triton.jit`` functions and their tile configs).

Shapes and names used throughout (M = N*H*W pixels, enumerated as m = (n*H + h)*W + w):

    x    [N, Cin,  H,  W ]  any 4-D strides (NCHW, channels_last, strided views)
    W    [Cout, Cin]        any 2-D strides
    b    [Cout]
    top  [N, Cout, Ht, Wt]  any 4-D strides, any Ht, Wt >= 1 (nearest up- or down-sampling)
    out  [N, Cout, H,  W ]  any 4-D strides (the launcher allocates it in x's memory format)

Forward:   out[n, co, h, w] = sum_ci x[n, ci, h, w] * W[co, ci] + b[co] + top[n, co, sh(h), sw(w)]
with ATen's float32 nearest rule sh(h) = min(floor(float32(h) * scale_h), Ht - 1),
scale_h = float32(Ht) / float32(H); same for w. The host computes the scales and passes them as fp32
scalars, except while torch.compile or torch.export traces the op with symbolic sizes (dynamic
shapes, Dims): a float of a symbolic size would pin it to its traced value, so the host then passes
the integer sizes only and the kernels compute the scales themselves (constexpr SCALE_IN_KERNEL,
``_nearest_scale``: a correctly rounded division; the same float32 values).

Backward of that: dx = dy . W (the forward kernel with W transposed through its strides),
dW = sum_m dy[m, :]^T x[m, :] (``_lateral_grad_weight_kernel``: split over pixels into a fixed
number of fp32 partial sums, reduced afterwards in a fixed order), db = sum_m dy[m, :] and
dtop = U^T(dy) (``_lateral_grad_bias_top_kernel``: one pass over dy). Nothing uses atomics, so
every result is bit-reproducible run to run.

This module imports triton only (no torch), so the ahead-of-time compile test can import it in a
process of its own. Config lists: ``*_CONFIGS[(arch, kind)]`` with arch "sm90" / "sm80" and kind
"16bit" (fp16/bf16), "tf32" or "ieee" (fp32; ``operand_kind``), and ``NARROW_*_CONFIGS`` of the same
keys for launches that load NCHW pixels one element at a time (``narrow_pixel_loads``);
``INTERPRET_*`` is the one small config for TRITON_INTERPRET=1 (the autotuner would benchmark every
config under the interpreter).
"""
import inspect
import os

import triton
import triton.language as tl

# tl.dot spells the fp32 precision choice `input_precision` (triton >= 3.0) or `allow_tf32` (older):
# passed to the kernels as the USE_INPUT_PRECISION constexpr.
USE_INPUT_PRECISION = "input_precision" in inspect.signature(tl.dot).parameters


@triton.jit
def _tile_pids(tile, M, COUT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile ``tile``: tiles are numbered in groups of GROUP_M row
    tiles that walk the COUT tiles together (their x rows stay in L2, a weight tile serves GROUP_M)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(COUT, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _pixel_aligned(v, PIX_ALIGN: tl.constexpr):
    """v itself, written as (v // PIX_ALIGN) * PIX_ALIGN so the compiler knows it is a multiple of
    PIX_ALIGN. The host sets PIX_ALIGN only where it holds (``pixel_alignment``): for NCHW the pixel
    count H * W and the strides built from it. triton's JIT hints only multiples of 16, so NCHW maps
    whose H * W is not (ResNet-50-FPN's P4 and P5 at 800 x 1216: 50 x 76 and 25 x 38) had their
    pixel-contiguous x loads and out stores issued 2 bytes at a time, and with triton 3.8.0 the
    forward's pipelined A tiles spilled 160-768 B per thread at P4 and 200-640 B at P5 on sm_90."""
    if PIX_ALIGN > 1:
        v = v // PIX_ALIGN * PIX_ALIGN
    return v


@triton.jit
def _tile_rows(pid_m, M, HW, W_, sxn, sxh, sxw, X_FLAT: tl.constexpr, BLOCK_M: tl.constexpr):
    """The BLOCK_M pixels m = (n, h, w) of row tile pid_m: (offs_m, mask_m, n64, rem = h*W + w, h, w,
    x_row = int64 offset of pixel m in x). Masked rows past M are never dereferenced."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    n_idx = offs_m // HW
    rem = offs_m % HW
    h_idx = rem // W_
    w_idx = rem % W_
    n64 = n_idx.to(tl.int64)
    if X_FLAT:
        x_row = n64 * sxn + rem.to(tl.int64) * sxw
    else:
        x_row = n64 * sxn + h_idx.to(tl.int64) * sxh + w_idx.to(tl.int64) * sxw
    return offs_m, mask_m, n64, rem, h_idx, w_idx, x_row


@triton.jit
def _dot(a, b, acc, ALLOW_TF32: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr):
    """acc + a . b in fp32: TF32 tensor cores for fp32 inputs when ALLOW_TF32, IEEE fp32 otherwise
    (no effect on fp16/bf16), spelled the way this triton's tl.dot takes it (USE_INPUT_PRECISION)."""
    if USE_INPUT_PRECISION:
        if ALLOW_TF32:
            acc = tl.dot(a, b, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, allow_tf32=ALLOW_TF32)
    return acc


@triton.jit
def _fwd_k_step(acc, k0, x_ptr, w_ptr, x_row, w_col, mask_m, mask_n, CIN, sxc, swk,
                ALLOW_TF32: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += x[rows, k0:k0+BLOCK_K] . W^T[k0:k0+BLOCK_K, cols] (fp32 accumulation; K tail masked)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    mask_k = kk < CIN
    kk64 = kk.to(tl.int64)
    a = tl.load(x_ptr + (x_row[:, None] + (kk64 * sxc)[None, :]), mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    b = tl.load(w_ptr + ((kk64 * swk)[:, None] + w_col[None, :]), mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    return _dot(a, b, acc, ALLOW_TF32, USE_INPUT_PRECISION)


@triton.jit
def _fwd_tma_descriptors(x_ptr, w_ptr, M, CIN, COUT, sxw, swn,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(x_desc, w_desc): TMA descriptors of x's pixel rows as a [M, CIN] matrix (row stride sxw: x is
    channels_last with dense rows, ``tma_loads``) in [BLOCK_M, BLOCK_K] boxes, and of W [COUT, CIN]
    (row stride swn, Cin contiguous) in [BLOCK_N, BLOCK_K] boxes. Built on the device (128 bytes of
    global scratch each, 256 per program, from triton's allocator); the copy engine zero-fills a box's
    rows past M and COUT and its columns past CIN, where ``_fwd_k_step`` masks its loads."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, CIN], strides=[sxw, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[COUT, CIN], strides=[swn, 1], block_shape=[BLOCK_N, BLOCK_K])
    return x_desc, w_desc


@triton.jit
def _fwd_k_step_tma(acc, k0, x_desc, w_desc, m0, n0,
                    ALLOW_TF32: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr):
    """``_fwd_k_step`` through the copy engine: acc += x[m0:m0+BLOCK_M, k0:k0+BLOCK_K] .
    W[n0:n0+BLOCK_N, k0:k0+BLOCK_K]^T (both tiles K-contiguous, the layout wgmma reads for every
    dtype, TF32 included)."""
    a = x_desc.load([m0, k0])
    b = w_desc.load([n0, k0])
    return _dot(a, tl.trans(b), acc, ALLOW_TF32, USE_INPUT_PRECISION)


@triton.jit
def _nearest_scale(SRC, DST):
    """ATen's nearest scale float32(SRC) / float32(DST), correctly rounded (div_rn: IEEE division;
    a plain fp32 ``/`` compiles to an approximate division on NVIDIA GPUs, and one ulp low would
    pick the row before for exact ratios). SRC, DST: integer scalars or tensors, DST >= 1 (tl.cast,
    not .to: a size of 1 reaches the kernel as a constexpr, which the JIT specializes)."""
    return tl.math.div_rn(tl.cast(SRC, tl.float32), tl.cast(DST, tl.float32))


@triton.jit
def _nearest_src(dst, scale, SRC):
    """ATen's float32 nearest rule, bit for bit (DESIGN.md §2): the source index of destination index
    dst (int32, elementwise) is min(floor(float32(dst) * scale), SRC - 1), scale = float32(SRC / DST)."""
    return tl.minimum(tl.floor(dst.to(tl.float32) * scale).to(tl.int32), SRC - 1)


@triton.jit
def _fwd_epilogue(acc, offs_n, mask_m, mask_n, n64, rem, h_idx, w_idx,
                  b_ptr, top_ptr, out_ptr, HT, WT, scale_h, scale_w, sb, stn, stc, sth, stw, son, soc, soh, sow,
                  HAS_BIAS: tl.constexpr, HAS_TOP: tl.constexpr, O_FLAT: tl.constexpr):
    """out[rows, cols] = acc + b[cols] + top[n, cols, sh(h), sw(w)], stored in out's dtype."""
    mask = mask_m[:, None] & mask_n[None, :]
    offs_n64 = offs_n.to(tl.int64)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n64 * sb, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if HAS_TOP:
        src_h = _nearest_src(h_idx, scale_h, HT)
        src_w = _nearest_src(w_idx, scale_w, WT)
        t_row = n64 * stn + src_h.to(tl.int64) * sth + src_w.to(tl.int64) * stw
        t = tl.load(top_ptr + (t_row[:, None] + (offs_n64 * stc)[None, :]), mask=mask, other=0.0)
        acc += t.to(tl.float32)
    if O_FLAT:
        o_row = n64 * son + rem.to(tl.int64) * sow
    else:
        o_row = n64 * son + h_idx.to(tl.int64) * soh + w_idx.to(tl.int64) * sow
    tl.store(out_ptr + (o_row[:, None] + (offs_n64 * soc)[None, :]), acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _halves(t, ROWS: tl.constexpr, COLS: tl.constexpr):
    """(t[:, :COLS // 2], t[:, COLS // 2:]) of a [ROWS, COLS] tensor (reshape, permute, split)."""
    return tl.split(tl.permute(tl.reshape(t, (ROWS, 2, COLS // 2)), (0, 2, 1)))


@triton.jit
def _fwd_epilogue_halves(acc, col0, mask_m, n64, rem, h_idx, w_idx, COUT,
                         b_ptr, top_ptr, out_ptr, HT, WT, scale_h, scale_w, sb, stn, stc, sth, stw, son, soc, soh, sow,
                         HAS_BIAS: tl.constexpr, HAS_TOP: tl.constexpr, O_FLAT: tl.constexpr,
                         BLOCK_M: tl.constexpr, COLS: tl.constexpr):
    """``_fwd_epilogue`` of acc [BLOCK_M, COLS] (output columns col0 + [0, COLS)), one half at a time."""
    first, second = _halves(acc, BLOCK_M, COLS)
    o = col0 + tl.arange(0, COLS // 2)
    _fwd_epilogue(first, o, mask_m, o < COUT, n64, rem, h_idx, w_idx, b_ptr, top_ptr, out_ptr, HT, WT,
                  scale_h, scale_w, sb, stn, stc, sth, stw, son, soc, soh, sow, HAS_BIAS, HAS_TOP, O_FLAT)
    o += COLS // 2
    _fwd_epilogue(second, o, mask_m, o < COUT, n64, rem, h_idx, w_idx, b_ptr, top_ptr, out_ptr, HT, WT,
                  scale_h, scale_w, sb, stn, stc, sth, stw, son, soc, soh, sow, HAS_BIAS, HAS_TOP, O_FLAT)


@triton.jit
def _fwd_epilogue_tile(acc, pid_n, mask_m, n64, rem, h_idx, w_idx, COUT,
                       b_ptr, top_ptr, out_ptr, HT, WT, HW, W_, scale_h, scale_w,
                       sb, stn, stc, sth, stw, son, soc, soh, sow,
                       HAS_BIAS: tl.constexpr, HAS_TOP: tl.constexpr, O_FLAT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCALE_IN_KERNEL: tl.constexpr):
    """``_fwd_epilogue`` of the [BLOCK_M, BLOCK_N] tile pid_n, in column quarters (BLOCK_N >= 128) or
    halves (64): the top gather's pointers and values of a whole 128 x 256 tile, with the fp32
    accumulator, need more than the 255 registers of a thread, and the compiled kernel spilled (sm_90,
    per thread: triton 3.6.0 8-64 B for channels_last, 208-424 B for NCHW; triton 3.8.0 184-200 B and
    2088-2184 B); a quarter at a time it does not, with either.
    SCALE_IN_KERNEL: the nearest scales (HT / H with H = HW // W_, WT / W_) are computed here, after
    the K loop, instead of taken from scale_h, scale_w. Those are cast to fp32 (a no-op for the
    launcher's fp32 scalars): inductor passes a Python float to a kernel it compiles as fp64, and
    the rule's product float32(h) * scale would then run in fp64 and pick other rows."""
    if HAS_TOP:   # (without a top, triton 3.6 kept the unused division of dx: 16 B of stack on sm_80)
        if SCALE_IN_KERNEL:
            scale_h = _nearest_scale(HT, HW // W_)
            scale_w = _nearest_scale(WT, W_)
        else:
            scale_h = tl.cast(scale_h, tl.float32)
            scale_w = tl.cast(scale_w, tl.float32)
    col0 = pid_n * BLOCK_N
    if BLOCK_N >= 128:
        lo, hi = _halves(acc, BLOCK_M, BLOCK_N)
        _fwd_epilogue_halves(lo, col0, mask_m, n64, rem, h_idx, w_idx, COUT, b_ptr, top_ptr, out_ptr, HT, WT,
                             scale_h, scale_w, sb, stn, stc, sth, stw, son, soc, soh, sow,
                             HAS_BIAS, HAS_TOP, O_FLAT, BLOCK_M, BLOCK_N // 2)
        _fwd_epilogue_halves(hi, col0 + BLOCK_N // 2, mask_m, n64, rem, h_idx, w_idx, COUT, b_ptr, top_ptr, out_ptr,
                             HT, WT, scale_h, scale_w, sb, stn, stc, sth, stw, son, soc, soh, sow,
                             HAS_BIAS, HAS_TOP, O_FLAT, BLOCK_M, BLOCK_N // 2)
    elif BLOCK_N >= 64:
        _fwd_epilogue_halves(acc, col0, mask_m, n64, rem, h_idx, w_idx, COUT, b_ptr, top_ptr, out_ptr, HT, WT,
                             scale_h, scale_w, sb, stn, stc, sth, stw, son, soc, soh, sow,
                             HAS_BIAS, HAS_TOP, O_FLAT, BLOCK_M, BLOCK_N)
    else:
        o = col0 + tl.arange(0, BLOCK_N)
        _fwd_epilogue(acc, o, mask_m, o < COUT, n64, rem, h_idx, w_idx, b_ptr, top_ptr, out_ptr, HT, WT,
                      scale_h, scale_w, sb, stn, stc, sth, stw, son, soc, soh, sow, HAS_BIAS, HAS_TOP, O_FLAT)


@triton.jit
def _fwd_resident_weight(x_ptr, w_ptr, b_ptr, top_ptr, out_ptr, M, HW, W_, CIN, COUT, HT, WT, scale_h, scale_w,
                         sxn, sxc, sxh, sxw, swn, swk, sb, stn, stc, sth, stw, son, soc, soh, sow,
                         HAS_BIAS: tl.constexpr, HAS_TOP: tl.constexpr, X_FLAT: tl.constexpr, O_FLAT: tl.constexpr,
                         ALLOW_TF32: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SCALE_IN_KERNEL: tl.constexpr):
    """The forward, weight-stationary (RESIDENT_W; CIN <= BLOCK_K): out[rows, cols] = x[rows, :] . Wt + b + top
    for column tile pid_n = pid % n_tiles and row tiles pid // n_tiles, + nprog // n_tiles, ... with
    Wt = W^T[:, cols] ([BLOCK_K, BLOCK_N], rows past CIN zero) loaded once per program. The loop body
    is one x load, one dot and the epilogue, so the software pipeliner keeps the weight in shared
    memory for the whole loop and issues the next row tile's x load before this tile's dot: the
    weight is read from L2 once per program instead of once per tile (per tile of 128 x 256 at P2,
    Cin 256, twice the bytes of the x tile), and x streams during the epilogues."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(COUT, BLOCK_N)
    pid_n = pid % n_tiles
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < COUT
    kk = tl.arange(0, BLOCK_K)
    mask_k = kk < CIN
    kk64 = kk.to(tl.int64)
    wt = tl.load(w_ptr + ((kk64 * swk)[:, None] + (offs_n.to(tl.int64) * swn)[None, :]),
                 mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    for pid_m in range(pid // n_tiles, tl.cdiv(M, BLOCK_M), tl.num_programs(0) // n_tiles):
        offs_m, mask_m, n64, rem, h_idx, w_idx, x_row = _tile_rows(pid_m, M, HW, W_, sxn, sxh, sxw, X_FLAT, BLOCK_M)
        a = tl.load(x_ptr + (x_row[:, None] + (kk64 * sxc)[None, :]), mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc = _dot(a, wt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), ALLOW_TF32, USE_INPUT_PRECISION)
        _fwd_epilogue_tile(acc, pid_n, mask_m, n64, rem, h_idx, w_idx, COUT, b_ptr, top_ptr, out_ptr, HT, WT,
                           HW, W_, scale_h, scale_w, sb, stn, stc, sth, stw, son, soc, soh, sow,
                           HAS_BIAS, HAS_TOP, O_FLAT, BLOCK_M, BLOCK_N, SCALE_IN_KERNEL)


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _lateral_fwd_kernel(
    x_ptr, w_ptr, b_ptr, top_ptr, out_ptr,
    M, HW, W_, CIN, COUT, HT, WT,
    scale_h, scale_w,
    sxn, sxc, sxh, sxw,
    swn, swk,
    sb,
    stn, stc, sth, stw,
    son, soc, soh, sow,
    TUNE_KEY,
    HAS_BIAS: tl.constexpr, HAS_TOP: tl.constexpr, X_FLAT: tl.constexpr, O_FLAT: tl.constexpr,
    ALLOW_TF32: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr, SCALE_IN_KERNEL: tl.constexpr, PIX_ALIGN: tl.constexpr, TMA: tl.constexpr,
    RESIDENT_W: tl.constexpr,
):
    """out[m, co] = sum_k x[m, k] * W[co, k] (fp32 accumulation) + b[co] + top[n, co, sh(h), sw(w)].

    A GEMM over pixels: rows m = (n, h, w) in [0, M), reduction k over CIN, columns co over COUT.
    x/top/out are addressed through their 4-D strides (in elements: s?n, s?c, s?h, s?w), the
    weight through (swn = stride over COUT, swk = stride over CIN), so NCHW, channels_last and
    strided views need no copy; the same kernel computes dx = dy . W in the backward by passing W
    with its two strides swapped. Row offsets are int64 (a tensor may pass 2^31 elements).
    Program ids are swizzled in groups of GROUP_M row tiles so that the x rows of a group stay in
    L2 while the group walks the COUT tiles (and a weight tile is reused by GROUP_M programs).

    Constexpr flags:
      HAS_BIAS / HAS_TOP: the bias / top gather-add epilogue is compiled in only when present
        (b_ptr / top_ptr are dummies otherwise, never dereferenced).
      X_FLAT / O_FLAT: x's / out's (h, w) dims flatten (s?h == W * s?w, true for NCHW and
        channels_last), so a pixel's offset is n * s?n + (h * W + w) * s?w. Written that way the
        compiler sees that consecutive pixels are consecutive in memory when s?w == 1 (NCHW) and
        vectorizes those loads/stores; the general h * s?h + w * s?w form hides it behind div/mod.
      ALLOW_TF32: fp32 inputs use TF32 tensor cores when True (when eager conv2d may:
        fused_fpn._precision.conv_allows_tf32), IEEE fp32 when False; no effect on fp16/bf16.
      USE_INPUT_PRECISION: tl.dot spells the choice ``input_precision`` (triton >= 3.0) or, on
        older triton, ``allow_tf32``; the host picks the one this triton understands.
      BLOCK_M/N/K, GROUP_M: tile shape and swizzle group (autotuned per problem shape).
      PIX_ALIGN: HW and x's and out's batch and channel strides are multiples of it (``_pixel_aligned``;
        1 for channels_last, where the channel stride is 1, and for symbolic sizes not known to be).
      PERSISTENT: the grid is smaller than the number of output tiles and each program walks tiles
        pid, pid + num_programs, ... (the host sizes the grid from the SM count) in one loop over its
        (tile, K step) pairs, so the software pipeliner can issue the next tile's loads during this
        tile's epilogue; otherwise one program per tile.
      TMA: x and W tiles come through the copy engine (``_fwd_tma_descriptors``, ``_fwd_k_step_tma``)
        instead of per-thread loads; only where the launcher's ``tma_loads`` holds (x channels_last
        with dense rows, W Cin-contiguous, 16-byte aligned bases and row strides: the forward, not
        dx). The epilogue is the same.
      RESIDENT_W: weight-stationary (``_fwd_resident_weight``): the whole reduction fits one K block
        (CIN <= BLOCK_K, ``resident_fwd_configs``), each program loads its [BLOCK_K, BLOCK_N] weight
        tile once and keeps it in shared memory while it walks row tiles pid_m = pid // n_tiles,
        + nprog // n_tiles, ... of one column tile (the host's grid is a multiple of the column
        tiles, ``resident_grid``); x's next row tile loads during this tile's product and epilogue.

    TUNE_KEY is not read by the kernel: it is the autotuner's key (``tune_key``: the power-of-two
    bucket of M and the layout bits), so a new image size re-tunes only when it changes bucket.
    The nearest scales scale_h = float32(HT) / float32(H), scale_w likewise, come from the host, or
    with SCALE_IN_KERNEL (a trace with symbolic sizes; scale_h, scale_w then unused) are computed
    from HT, WT, HW, W_ in ``_fwd_epilogue_tile``.
    """
    if SCALE_IN_KERNEL:
        # a trace with symbolic sizes: inductor passes a size it cannot bound below 2^31 as int64, and
        # the per-pixel div / mod in int64 spilled 672-776 B in NCHW; the host keeps them below 2^31
        M = tl.cast(M, tl.int32)
        HW = tl.cast(HW, tl.int32)
        W_ = tl.cast(W_, tl.int32)
        HT = tl.cast(HT, tl.int32)
        WT = tl.cast(WT, tl.int32)
    HW = _pixel_aligned(HW, PIX_ALIGN)
    sxn = _pixel_aligned(sxn, PIX_ALIGN)
    sxc = _pixel_aligned(sxc, PIX_ALIGN)
    son = _pixel_aligned(son, PIX_ALIGN)
    soc = _pixel_aligned(soc, PIX_ALIGN)
    if TMA:
        x_desc, w_desc = _fwd_tma_descriptors(x_ptr, w_ptr, M, CIN, COUT, sxw, swn, BLOCK_M, BLOCK_N, BLOCK_K)
    if RESIDENT_W:
        _fwd_resident_weight(x_ptr, w_ptr, b_ptr, top_ptr, out_ptr, M, HW, W_, CIN, COUT, HT, WT, scale_h, scale_w,
                             sxn, sxc, sxh, sxw, swn, swk, sb, stn, stc, sth, stw, son, soc, soh, sow,
                             HAS_BIAS, HAS_TOP, X_FLAT, O_FLAT, ALLOW_TF32, USE_INPUT_PRECISION,
                             BLOCK_M, BLOCK_N, BLOCK_K, SCALE_IN_KERNEL)
    elif PERSISTENT:
        # One loop over this program's (tile, K step) pairs, flattened by hand: the software pipeliner
        # then issues the next tile's x / W loads while this tile's epilogue runs (triton 3.6 does
        # not pipeline the loop that tl.range(flatten=True) makes of two nested loops; this one it does).
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(COUT, BLOCK_N)
        k_steps = tl.maximum(tl.cdiv(CIN, BLOCK_K), 1)   # CIN == 0: one masked step, then the epilogue
        my_tiles = tl.cdiv(num_tiles - pid, nprog)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for it in range(0, my_tiles * k_steps):
            tile = pid + (it // k_steps) * nprog
            ki = it % k_steps
            pid_m, pid_n = _tile_pids(tile, M, COUT, BLOCK_M, BLOCK_N, GROUP_M)
            offs_m, mask_m, n64, rem, h_idx, w_idx, x_row = _tile_rows(pid_m, M, HW, W_, sxn, sxh, sxw, X_FLAT,
                                                                       BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < COUT
            if TMA:
                acc = _fwd_k_step_tma(acc, ki * BLOCK_K, x_desc, w_desc, pid_m * BLOCK_M, pid_n * BLOCK_N,
                                      ALLOW_TF32, USE_INPUT_PRECISION)
            else:
                acc = _fwd_k_step(acc, ki * BLOCK_K, x_ptr, w_ptr, x_row, offs_n.to(tl.int64) * swn, mask_m, mask_n,
                                  CIN, sxc, swk, ALLOW_TF32, USE_INPUT_PRECISION, BLOCK_K)
            if ki == k_steps - 1:
                _fwd_epilogue_tile(acc, pid_n, mask_m, n64, rem, h_idx, w_idx, COUT, b_ptr, top_ptr, out_ptr, HT, WT,
                                   HW, W_, scale_h, scale_w, sb, stn, stc, sth, stw, son, soc, soh, sow,
                                   HAS_BIAS, HAS_TOP, O_FLAT, BLOCK_M, BLOCK_N, SCALE_IN_KERNEL)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        pid_m, pid_n = _tile_pids(tl.program_id(0), M, COUT, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m, mask_m, n64, rem, h_idx, w_idx, x_row = _tile_rows(pid_m, M, HW, W_, sxn, sxh, sxw, X_FLAT, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < COUT
        w_col = offs_n.to(tl.int64) * swn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, CIN, BLOCK_K):
            if TMA:
                acc = _fwd_k_step_tma(acc, k0, x_desc, w_desc, pid_m * BLOCK_M, pid_n * BLOCK_N,
                                      ALLOW_TF32, USE_INPUT_PRECISION)
            else:
                acc = _fwd_k_step(acc, k0, x_ptr, w_ptr, x_row, w_col, mask_m, mask_n, CIN, sxc, swk,
                                  ALLOW_TF32, USE_INPUT_PRECISION, BLOCK_K)
        _fwd_epilogue_tile(acc, pid_n, mask_m, n64, rem, h_idx, w_idx, COUT, b_ptr, top_ptr, out_ptr, HT, WT,
                           HW, W_, scale_h, scale_w, sb, stn, stc, sth, stw, son, soc, soh, sow,
                           HAS_BIAS, HAS_TOP, O_FLAT, BLOCK_M, BLOCK_N, SCALE_IN_KERNEL)


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _lateral_grad_weight_kernel(
    dy_ptr, x_ptr, part_ptr,
    M, HW, W_, CIN, COUT, ROWS_PER_SPLIT,
    sdn, sdc, sdh, sdw,
    sxn, sxc, sxh, sxw,
    TUNE_KEY,
    D_FLAT: tl.constexpr, X_FLAT: tl.constexpr,
    ALLOW_TF32: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_M: tl.constexpr, PIX_ALIGN: tl.constexpr,
):
    """part[s, co, ci] = sum_{m in split s} dy[m, co] * x[m, ci]   (fp32, no atomics).

    dy [N, COUT, H, W] and x [N, CIN, H, W] through their 4-D strides (any layout); part is a
    contiguous fp32 buffer [SPLIT, COUT, CIN]. Grid: (COUT tiles * CIN tiles, SPLIT); split s owns
    pixels [s * ROWS_PER_SPLIT, (s + 1) * ROWS_PER_SPLIT) and walks them BLOCK_M at a time. The
    host sums part over s (a fixed-order reduction), so dW = sum_m dy^T x is deterministic. The tile
    index is program_id(0) so the tiles of one pixel chunk run side by side and share it in L2.

    Constexpr flags: D_FLAT / X_FLAT: dy's / x's (h, w) dims flatten (contiguous pixel runs are
    visible to the compiler, as X_FLAT in ``_lateral_fwd_kernel``); ALLOW_TF32 / USE_INPUT_PRECISION
    as there (TF32 or IEEE for fp32, and how this triton spells it); BLOCK_CO/CI/M: tile shape;
    PIX_ALIGN: HW and dy's and x's batch and channel strides are multiples of it (``_pixel_aligned``).
    TUNE_KEY: the autotuner's key, not read by the kernel (``tune_key``).
    """
    HW = _pixel_aligned(HW, PIX_ALIGN)
    sdn = _pixel_aligned(sdn, PIX_ALIGN)
    sdc = _pixel_aligned(sdc, PIX_ALIGN)
    sxn = _pixel_aligned(sxn, PIX_ALIGN)
    sxc = _pixel_aligned(sxc, PIX_ALIGN)
    pid_tile = tl.program_id(0)
    split = tl.program_id(1)
    n_ci = tl.cdiv(CIN, BLOCK_CI)
    pid_co = pid_tile // n_ci
    pid_ci = pid_tile % n_ci
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    mask_co = offs_co < COUT
    mask_ci = offs_ci < CIN
    co_off = offs_co.to(tl.int64) * sdc
    ci_off = offs_ci.to(tl.int64) * sxc

    m_start = split * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        n64 = (offs_m // HW).to(tl.int64)
        rem = offs_m % HW
        rem64 = rem.to(tl.int64)
        h64 = (rem // W_).to(tl.int64)
        w64 = (rem % W_).to(tl.int64)
        if D_FLAT:
            dy_row = n64 * sdn + rem64 * sdw
        else:
            dy_row = n64 * sdn + h64 * sdh + w64 * sdw
        if X_FLAT:
            x_row = n64 * sxn + rem64 * sxw
        else:
            x_row = n64 * sxn + h64 * sxh + w64 * sxw
        a = tl.load(dy_ptr + (co_off[:, None] + dy_row[None, :]),
                    mask=mask_co[:, None] & mask_m[None, :], other=0.0)
        b = tl.load(x_ptr + (x_row[:, None] + ci_off[None, :]),
                    mask=mask_m[:, None] & mask_ci[None, :], other=0.0)
        acc = _dot(a, b, acc, ALLOW_TF32, USE_INPUT_PRECISION)

    part = part_ptr + split.to(tl.int64) * COUT * CIN
    offs = offs_co.to(tl.int64)[:, None] * CIN + offs_ci[None, :]
    tl.store(part + offs, acc, mask=mask_co[:, None] & mask_ci[None, :])


@triton.jit
def _search_steps(DST):
    """bit_length(DST) + 1 for an integer scalar DST >= 0: enough steps for ``_nearest_first_dst``'s
    binary search over [0, DST] (computed here, not on the host, so symbolic sizes stay symbolic).
    DST < 2^31 (the host's pixel limit); a DST of 1 arrives as a constexpr: made a tensor first."""
    rest = tl.cast(DST, tl.int32)
    steps = rest * 0 + 1
    while rest > 0:
        rest = rest // 2
        steps += 1
    return steps


@triton.jit
def _nearest_first_dst(t, DST, SRC, scale, N_ITER):
    """Smallest d in [0, DST] whose nearest source min(floor(float32(d) * scale), SRC - 1) is >= t
    (DST if there is none): a binary search of N_ITER >= bit_length(DST) + 1 steps, elementwise on
    t. The source index is monotone in d, so the preimage of source t is [first(t), first(t + 1)).
    DST (< 2^31) is cast to int32: an int64 size (inductor passes sizes whose range it cannot bound
    as i64) would make hi int64 and the loop-carried lo, hi change type."""
    DST = tl.cast(DST, tl.int32)
    lo = t * 0
    hi = lo + DST
    for _ in range(N_ITER):
        active = lo < hi
        mid = lo + (hi - lo) // 2   # not (lo + hi) // 2: that passes 2^31 in int32 once DST >= 2^30
        src = _nearest_src(mid, scale, SRC)
        right = src >= t
        hi = tl.where(active & right, mid, hi)
        lo = tl.where(active & (~right), mid + 1, lo)
    return lo


@triton.jit
def _lateral_grad_bias_top_kernel(
    dy_ptr, dtop_ptr, dbpart_ptr,
    H, W_, HT, WT, C, N_TW_BLOCKS, ROWS,
    scale_h, scale_w, ITER_H, ITER_W,
    sdn, sdc, sdh, sdw,
    stn, stc, sth, stw,
    HAS_TOP: tl.constexpr, BLOCK_TW: tl.constexpr, BLOCK_C: tl.constexpr, SCALE_IN_KERNEL: tl.constexpr,
):
    """dtop[n, c, i, j] = sum over (h, w) with sh(h) = i, sw(w) = j of dy[n, c, h, w]   (U^T dy)
    dbpart[p, c]       = sum over the dy pixels of row p's programs               (db = sum_p dbpart)

    One pass over dy [N, C, H, W] (any strides), in a 1-D grid of ROWS * ceil(C / BLOCK_C) programs
    (ROWS = N * HT * N_TW_BLOCKS; the host keeps it below 2^31; a 2-D grid's y size, at most 65535,
    would limit C). Program pid owns row p = pid % ROWS, that is top row i of image n and a block of
    BLOCK_TW top columns, and channel block pid // ROWS of BLOCK_C channels; the preimage of a top
    pixel is the row range [first(i), first(i + 1)) x column range [first(j), first(j + 1))
    (``_nearest_first_dst``, the same float32 rule as the forward), summed in a fixed order in
    fp32: deterministic, no atomics.
    Top pixels with an empty preimage (downsampling) get 0. Every dy pixel lies in exactly one
    preimage, so the partial sums dbpart [N*HT*N_TW_BLOCKS, C] (contiguous fp32) add up to db.

    Constexpr flags:
      HAS_TOP: write dtop (dtop [N, C, HT, WT] through its strides). Without a top the host
        passes HT = H, WT = W, scale 1 (every preimage is one pixel) and only db is produced.
      BLOCK_TW, BLOCK_C: tile of top columns x channels.
      SCALE_IN_KERNEL: the nearest scales (HT / H, WT / W_) and the searches' depths
        (bit_length(H) + 1, bit_length(W_) + 1) are computed here (a trace with symbolic sizes),
        instead of taken from scale_h, scale_w (cast to fp32: inductor passes Python floats as
        fp64), ITER_H, ITER_W.
    """
    if SCALE_IN_KERNEL:
        scale_h = _nearest_scale(HT, H)
        scale_w = _nearest_scale(WT, W_)
        iter_h = _search_steps(H)
        iter_w = _search_steps(W_)
    else:
        scale_h = tl.cast(scale_h, tl.float32)
        scale_w = tl.cast(scale_w, tl.float32)
        iter_h = ITER_H
        iter_w = ITER_W
    pid = tl.program_id(0)
    pid_c = pid // ROWS   # channel block
    p = pid % ROWS        # (n, top row, column block): row p of dbpart
    twb = p % N_TW_BLOCKS
    row = p // N_TW_BLOCKS
    ti = row % HT
    n = row // HT
    offs_tw = twb * BLOCK_TW + tl.arange(0, BLOCK_TW)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_tw = offs_tw < WT
    mask_c = offs_c < C

    h_lo = _nearest_first_dst(ti, H, HT, scale_h, iter_h)
    h_hi = _nearest_first_dst(ti + 1, H, HT, scale_h, iter_h)
    w_lo = _nearest_first_dst(offs_tw, W_, WT, scale_w, iter_w)
    w_hi = _nearest_first_dst(offs_tw + 1, W_, WT, scale_w, iter_w)
    w_len = tl.where(mask_tw, w_hi - w_lo, 0)
    max_len = tl.max(w_len, axis=0)

    n64 = n.to(tl.int64)
    zero64 = n64 * 0  # loop counters are plain ints under the interpreter: widen them through this
    base = dy_ptr + n64 * sdn
    c_off = offs_c.to(tl.int64) * sdc
    acc = tl.zeros((BLOCK_TW, BLOCK_C), dtype=tl.float32)
    for h in range(h_lo, h_hi):
        row_ptr = base + (zero64 + h) * sdh
        for j in range(0, max_len):
            mask_w = mask_tw & (j < w_len)
            w_off = (w_lo + j).to(tl.int64) * sdw
            g = tl.load(row_ptr + (w_off[:, None] + c_off[None, :]),
                        mask=mask_w[:, None] & mask_c[None, :], other=0.0)
            acc += g.to(tl.float32)

    if HAS_TOP:
        t_off = (n64 * stn + ti.to(tl.int64) * sth
                 + offs_tw.to(tl.int64)[:, None] * stw + (offs_c.to(tl.int64) * stc)[None, :])
        tl.store(dtop_ptr + t_off, acc.to(dtop_ptr.dtype.element_ty),
                 mask=mask_tw[:, None] & mask_c[None, :])
    db = tl.sum(acc, axis=0)
    tl.store(dbpart_ptr + p.to(tl.int64) * C + offs_c, db, mask=mask_c)


# ---------------------------------------------------------------------------------------------
# Configs, one list per (arch, kind): arch "sm90" / "sm80", kind what tl.dot multiplies
# (``operand_kind``): "16bit" (fp16/bf16 on tensor cores), "tf32" (fp32 on TF32 tensor cores) or
# "ieee" (fp32, exact dot: FMA, its operands in registers, so it takes smaller tiles per thread).
# Memory-bound regime (DESIGN.md §5): BLOCK_N = 256 covers all 256 output channels of an FPN so x is
# read exactly once; BLOCK_M 64-128; 2-4 pipeline stages. On sm_90 fp16/bf16 tl.dot lowers to wgmma
# (BLOCK_M a multiple of 64, num_warps a multiple of 4). Shared memory per stage is
# (BLOCK_M + BLOCK_N) * BLOCK_K * elem_bytes; every list stays under the arch's limit
# (232448 B on sm_90, 166912 B on sm_80), and no config of a default list spills registers when
# compiled by triton 3.6.0 or 3.8.0 for ResNet-50-FPN's P2 (tests/test_triton_aot.py checks both on
# compiled kernels), but for a few exact-fp32 (IEEE) ones on NCHW or strided x (KNOWN_VARIANT_SPILLS
# there, 8-248 B) and the sm_80 fp16 NCHW weight gradient's 4-warp one with 3.6.0 (56 B); fp16 NCHW at
# P4 / P5, whose H * W is no multiple of 16, and traces with symbolic sizes: KNOWN_NCHW_SPILLS and
# KNOWN_SYMBOLIC_SPILLS there.

KINDS = ("16bit", "tf32", "ieee")


def operand_kind(elem_bytes: int, allow_tf32: bool) -> str:
    """Which config list a launch takes: "16bit" for 2-byte elements, else "tf32" when TF32 is
    allowed (as for eager conv2d: fused_fpn._precision.conv_allows_tf32), "ieee" when not."""
    if elem_bytes == 2:
        return "16bit"
    return "tf32" if allow_tf32 else "ieee"


def _cfg(bm, bn, bk, warps, stages, group_m=8, persistent=False, tma=False, resident=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m,
                          "PERSISTENT": persistent, "TMA": tma, "RESIDENT_W": resident},
                         num_warps=warps, num_stages=stages)


FWD_CONFIGS = {
    ("sm90", "16bit"): [
        _cfg(128, 256, 64, 8, 3),
        _cfg(128, 256, 64, 8, 4),
        _cfg(128, 256, 32, 8, 4),
        _cfg(64, 256, 64, 4, 4),
        # <= 80 KB of shared memory and ~200 registers/thread at 4 warps: two CTAs per SM, so
        # one CTA's epilogue (top gather + store) overlaps the other's loads
        _cfg(64, 256, 32, 4, 3),
        _cfg(64, 256, 64, 4, 2),
        _cfg(128, 128, 64, 4, 4),
        _cfg(64, 128, 64, 4, 3),   # small M (P5: 1900 pixels): more CTAs than 128-row tiles give
        # deep K, few pixels (P5: M = 1900, Cin = 2048; P4: M = 7600, Cin = 1024): 64-column tiles
        # give 4x the CTAs of a 256-column one (120 on P5 instead of 30 with 64 x 256); x rows are
        # read once per column tile, but the repeats hit L2 (GROUP_M swizzle)
        _cfg(64, 64, 128, 4, 4),
        _cfg(64, 128, 128, 4, 3),
    ],
    ("sm90", "tf32"): [
        _cfg(128, 256, 32, 8, 3),
        _cfg(128, 128, 32, 8, 4),
        _cfg(64, 256, 32, 4, 3),
        _cfg(64, 128, 32, 4, 4),
        _cfg(64, 64, 64, 4, 3),    # deep K, few pixels (P4 / P5): more CTAs
    ],
    # exact fp32: at most 64 fp32 accumulators per thread (the TF32 list's 128 x 256 / 8 warps and
    # 64 x 256 / 4 warps spilled 160-272 B per thread, 64 x 128 / 4 warps 8 B)
    ("sm90", "ieee"): [
        _cfg(128, 128, 32, 8, 3),
        _cfg(64, 256, 32, 8, 3),
        _cfg(128, 64, 32, 8, 4),
        _cfg(64, 64, 64, 4, 3),
    ],
    # sm_80 (mma.sync: the accumulators and the operand fragments share the registers), fp16/bf16
    # and TF32: 128 x 256 tiles spilled 8-56 B per thread (triton 3.6.0: BLOCK_K = 64 and fp32;
    # 3.8.0: NCHW), 128 x 128 at 4 warps 8-88 B, 64 x 256 x 64 32-112 B; the tiles below do not
    ("sm80", "16bit"): [
        _cfg(64, 256, 32, 4, 4),
        _cfg(128, 128, 64, 8, 4),
        _cfg(128, 128, 32, 8, 4),
        _cfg(64, 128, 32, 4, 4),
        _cfg(64, 64, 64, 4, 4),    # deep K, few pixels (P4 / P5): more CTAs
    ],
    ("sm80", "tf32"): [
        _cfg(128, 128, 32, 8, 4),
        _cfg(64, 256, 32, 8, 3),
        _cfg(64, 128, 32, 8, 4),
        _cfg(64, 64, 64, 4, 3),
    ],
    ("sm80", "ieee"): [
        _cfg(64, 256, 32, 8, 3),
        _cfg(64, 128, 32, 8, 4),
        _cfg(128, 64, 32, 8, 4),
    ],
}
# Launches that load x's NCHW pixels one element at a time, an address each (``narrow_pixel_loads``:
# H * W odd, symbolic sizes in a trace, or a view whose pixels are not contiguous or whose (h, w) do
# not flatten): the lists above spill there. Compiled for sm_90 with triton 3.8.0 as a dynamic-shape
# trace compiles them, 200-1312 B per thread in 7 of 10 fp16 configs, 600-640 B in the TF32 256-column
# ones, 24-48 B in every exact-fp32 one (3.6.0: fp16 8-40 B in 3 configs of sm_90 and sm_80). These
# lists keep the accumulator at 64 fp32 registers per thread or fewer (at most 32 for exact fp32,
# whose FMA dot holds both operands in registers) and spill nothing with either version, fp16 and
# fp32, at P2 as traced and at P5's sizes (as views whose h, w do not flatten: 8-104 B in 3 configs,
# tests/test_triton_aot.py::KNOWN_NARROW_SPILLS).
_NARROW_TF32 = [_cfg(128, 128, 32, 8, 4), _cfg(64, 128, 32, 4, 4), _cfg(64, 128, 32, 8, 3), _cfg(64, 64, 64, 4, 3)]
NARROW_FWD_CONFIGS = {
    ("sm90", "16bit"): [
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 128, 32, 8, 4),
        _cfg(64, 128, 64, 4, 3),
        _cfg(64, 128, 32, 4, 4),
        _cfg(64, 64, 128, 4, 4),   # deep K, few pixels
        _cfg(64, 64, 64, 4, 3),
    ],
    # sm_80: 128 x 64 at 4 warps spilled 352-592 B, 64 x 128 x 64 at 8 warps 8 B (3.8.0)
    ("sm80", "16bit"): [
        _cfg(128, 128, 32, 8, 4),
        _cfg(64, 128, 32, 4, 4),
        _cfg(64, 64, 64, 4, 4),
    ],
    ("sm90", "tf32"): _NARROW_TF32,
    ("sm80", "tf32"): _NARROW_TF32,
    # exact fp32: 64 x 64 x 32 at 4 warps spilled 24-240 B, 128 x 128 x 16 at 8 warps 8-16 B, and on
    # sm_80 64 x 64 x 64 at 8 warps 96-3456 B (3.8.0)
    ("sm90", "ieee"): [
        _cfg(64, 128, 16, 8, 3),
        _cfg(64, 64, 64, 8, 3),
    ],
    ("sm80", "ieee"): [
        _cfg(64, 128, 16, 8, 3),
        _cfg(128, 64, 16, 8, 4),
    ],
}
INTERPRET_FWD = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4, "PERSISTENT": False, "TMA": False,
                 "RESIDENT_W": False}

# Experimental forward configs, offered to the autotuner only with FUSED_FPN_TRITON_EXPERIMENTAL=1
# (``experimental_enabled``): persistent programs (one per SM) that walk their tiles in one loop over
# (tile, K step) pairs. The lateral levels are short GEMMs (K = Cin = 256 on P2:
# 4 K steps of 64) with a large epilogue (top gather + store of a 128 x 256 tile); with one CTA per
# SM the next tile's x loads wait for this tile's epilogue, and a flattened persistent loop can
# overlap them. Not in the default lists until a GPU run has checked them (tests/test_triton_gpu.py
# runs every config of both lists on its own against the float64 reference) and timed them
# (provider ``fused-triton-x`` beside ``fused-triton`` in the benchmark: ``--bench-providers
# eager,fused-triton,fused-triton-x``; the variable set for a whole run changes both rows).
EXPERIMENTAL_FWD_CONFIGS = {
    ("sm90", "16bit"): [
        _cfg(128, 256, 64, 8, 3, persistent=True),
        _cfg(128, 256, 64, 8, 4, persistent=True),
        _cfg(64, 256, 64, 4, 4, persistent=True),
        _cfg(128, 128, 64, 4, 4, persistent=True),
    ],
}
# Experimental forward configs that take x and W through the copy engine (TMA, ``_fwd_tma_descriptors``),
# offered with FUSED_FPN_TRITON_EXPERIMENTAL=1 to sm_90 launches where ``tma_loads`` holds (the forward
# on channels_last x with dense rows; not dx, not NCHW). With TMA a tile's loads take one thread's
# instruction instead of each thread's address arithmetic and 16-byte copies, and the tiles land in
# shared memory in the swizzled layout wgmma reads. Whether that helps these short GEMMs (4 K steps
# on P2) is for the benchmark to say (provider ``fused-triton-x``; the results' notes name the config
# the autotuner chose on each level), as for the persistent configs above.
TMA_FWD_CONFIGS = {
    ("sm90", "16bit"): [
        _cfg(128, 256, 64, 8, 3, tma=True),
        _cfg(128, 256, 64, 8, 4, tma=True),
        _cfg(64, 256, 64, 4, 4, tma=True),
        _cfg(64, 64, 128, 4, 4, tma=True),     # deep K, few pixels (P4 / P5)
        _cfg(128, 256, 64, 8, 3, persistent=True, tma=True),
        _cfg(128, 128, 64, 4, 4, persistent=True, tma=True),
    ],
    ("sm90", "tf32"): [
        _cfg(128, 256, 32, 8, 3, tma=True),
        _cfg(64, 256, 32, 4, 3, tma=True),
        _cfg(64, 64, 64, 4, 3, tma=True),      # deep K, few pixels
    ],
}
# Experimental weight-stationary forward configs (RESIDENT_W, ``_fwd_resident_weight``), offered with
# FUSED_FPN_TRITON_EXPERIMENTAL=1 to sm_90 fp16/bf16 eager launches on x with unit channel stride
# (channels_last; in NCHW the 4-warp config spilled 288-352 B and the 8-warp one needs 256 KiB of shared
# memory) whose reduction fits one K block: ``resident_fwd_configs`` gives those of the smallest BLOCK_K
# >= K. Each program keeps its weight tile in shared memory for all its row tiles. The default configs
# read the weight tile from L2 once per output tile: at P2 (Cin 256, 950 tiles of 128 x 256) 124 MB
# of weight reads beside the 62 MB of x, the 62 MB of top gathers and the 62 MB of out stores that pass
# through L2, more L2 traffic than the bytes DRAM must move. Compiled for sm_90 at P2's sizes
# (triton 3.6.0 and 3.8.0): no spills, wgmma, x pipelined (2 or 3 async stages).
RESIDENT_FWD_CONFIGS = {
    ("sm90", "16bit"): [
        _cfg(64, 256, 256, 8, 2, resident=True),    # W 128 KiB + 2 x 32 KiB of x (212992 B)
        _cfg(64, 256, 256, 4, 2, resident=True),    # one warpgroup: 248-254 registers
        _cfg(128, 128, 256, 8, 2, resident=True),   # W 64 KiB + 2 x 64 KiB; two column tiles
        _cfg(128, 256, 128, 8, 3, resident=True),   # Cin <= 128
        _cfg(64, 256, 128, 4, 3, resident=True),
    ],
}
EXPERIMENTAL_ENV = "FUSED_FPN_TRITON_EXPERIMENTAL"


def _env_flag(name: str, default: bool) -> bool:
    """An on/off environment switch, read now: a switch that defaults to on is off only for
    0 / false / off / no, one that defaults to off is on only for 1 / true / on / yes."""
    value = os.environ.get(name, "").strip().lower()
    return value not in ("0", "false", "off", "no") if default else value in ("1", "true", "on", "yes")


def experimental_enabled() -> bool:
    """True when FUSED_FPN_TRITON_EXPERIMENTAL is 1 / true / on / yes (read now: the launchers read it at
    each forward launch, and once per backward for its three launches)."""
    return _env_flag(EXPERIMENTAL_ENV, default=False)


def resident_fwd_configs(arch: str, kind: str, k: int):
    """The weight-stationary configs for a reduction over k channels: those of
    RESIDENT_FWD_CONFIGS[(arch, kind)] whose BLOCK_K is the smallest one >= k ([] when none is, or
    k < 1). One BLOCK_K per list, so a launch's autotuner is the same object for every k it serves."""
    configs = RESIDENT_FWD_CONFIGS.get((arch, kind), [])
    fits = [c.kwargs["BLOCK_K"] for c in configs if c.kwargs["BLOCK_K"] >= k]
    if k < 1 or not fits:
        return []
    return [c for c in configs if c.kwargs["BLOCK_K"] == min(fits)]


def resident_grid(tiles: int, column_tiles: int, sms: int) -> int:
    """Programs of a RESIDENT_W launch: one per SM, rounded down to a multiple of the column tiles
    (each program serves one column tile, ``_fwd_resident_weight``), at least one per column tile and
    at most one per output tile (``tiles`` is a multiple of ``column_tiles``)."""
    return min(tiles, max(column_tiles, sms // column_tiles * column_tiles))


def fwd_configs(arch: str, kind: str, experimental: bool = False, narrow: bool = False, tma: bool = False,
                resident_k: int = 0):
    """The forward's config list for (arch, kind): NARROW_FWD_CONFIGS' when ``narrow`` (x's pixel
    loads one element wide, ``narrow_pixel_loads``), else FWD_CONFIGS' plus, when ``experimental``,
    EXPERIMENTAL_FWD_CONFIGS', TMA_FWD_CONFIGS' when ``tma`` too (the launch's operands allow it:
    ``tma_loads``) and, when ``resident_k`` (the launch's reduction size, where the launcher offers
    them: ``lateral_launch.resident_reduction``), ``resident_fwd_configs(arch, kind, resident_k)``."""
    tables = _fwd_config_tables(arch, kind, experimental, narrow, tma, resident_k)
    if narrow:
        return tables[0]
    default, persistent, tma_list, resident = tables
    return (default + (persistent or []) + (tma_list or [])
            + (resident_fwd_configs(arch, kind, resident_k) if resident else []))


def _fwd_config_tables(arch: str, kind: str, experimental: bool, narrow: bool, tma: bool, resident_k: int) -> tuple:
    """The table entries ``fwd_configs`` joins for these arguments, in order, None for each table it
    leaves out (or that has no entry): (NARROW_FWD_CONFIGS',) when ``narrow``, else (FWD_CONFIGS',
    EXPERIMENTAL_FWD_CONFIGS', TMA_FWD_CONFIGS', RESIDENT_FWD_CONFIGS'). ``autotuned_fwd`` compares
    them by identity to tell whether the autotuner it kept still has the list's configs."""
    key = (arch, kind)
    if narrow:
        return (NARROW_FWD_CONFIGS[key],)
    return (FWD_CONFIGS[key], EXPERIMENTAL_FWD_CONFIGS.get(key) if experimental else None,
            TMA_FWD_CONFIGS.get(key) if experimental and tma else None,
            RESIDENT_FWD_CONFIGS.get(key) if experimental and resident_k else None)


def _wcfg(bm, warps, stages, bco=128, bci=128):
    return triton.Config({"BLOCK_CO": bco, "BLOCK_CI": bci, "BLOCK_M": bm},
                         num_warps=warps, num_stages=stages)


GRAD_WEIGHT_CONFIGS = {
    ("sm90", "16bit"): [_wcfg(64, 8, 4), _wcfg(128, 8, 3), _wcfg(64, 4, 4)],
    ("sm90", "tf32"): [_wcfg(32, 8, 4), _wcfg(64, 8, 3)],
    ("sm90", "ieee"): [_wcfg(32, 8, 4), _wcfg(64, 8, 3)],
    ("sm80", "16bit"): [_wcfg(32, 8, 4), _wcfg(64, 8, 3), _wcfg(64, 4, 3)],
    ("sm80", "tf32"): [_wcfg(32, 8, 3), _wcfg(32, 4, 4)],
    # exact fp32 on sm_80: 64-pixel steps at 8 warps spilled 1328 B per thread (triton 3.8.0), and
    # 32-pixel steps at 4 warps 536 B
    ("sm80", "ieee"): [_wcfg(32, 8, 3), _wcfg(16, 8, 4)],
}
# Weight gradients whose pixel-major dy or x the kernel cannot load in 16-byte vectors (PIX_ALIGN 1, no
# hint: P5's H * W = 950 in NCHW, symbolic sizes): their pixel loads go through registers (fp16: not
# even pipelined, cp.async takes 4 bytes or more), and the 4-warp configs above spilled 296-1032 B (fp16
# with triton 3.6.0 at 64 pixels: 1032 B on sm_90), 64-pixel steps at 8 warps 8-352 B but for TF32 on
# sm_90, 128-pixel ones 448 B (fp16, 3.6.0). 8 warps and 16- or 32-pixel steps (or TF32's 64 on sm_90)
# spill nothing with either version (sm_80 exact fp32: 16 pixels, 2 stages).
NARROW_GRAD_WEIGHT_CONFIGS = {
    ("sm90", "16bit"): [_wcfg(32, 8, 3), _wcfg(16, 8, 4)],
    ("sm90", "tf32"): [_wcfg(32, 8, 4), _wcfg(64, 8, 3), _wcfg(16, 8, 4)],
    ("sm90", "ieee"): [_wcfg(32, 8, 4), _wcfg(16, 8, 4)],
    ("sm80", "16bit"): [_wcfg(32, 8, 3), _wcfg(16, 8, 4)],
    ("sm80", "tf32"): [_wcfg(32, 8, 3), _wcfg(16, 8, 4)],
    ("sm80", "ieee"): [_wcfg(16, 8, 2)],
}


def grad_weight_configs(arch: str, kind: str, narrow: bool = False):
    """The weight gradient's config list for (arch, kind): NARROW_GRAD_WEIGHT_CONFIGS' when ``narrow``
    (dy's or x's pixel loads narrower than 16 bytes, ``narrow_pixel_loads``), else GRAD_WEIGHT_CONFIGS'."""
    return (NARROW_GRAD_WEIGHT_CONFIGS if narrow else GRAD_WEIGHT_CONFIGS)[(arch, kind)]


# The weight-gradient tile is fixed per mode (the host sizes the split buffer from it).
GRAD_WEIGHT_TILE = {"gpu": (128, 128), "interpret": (32, 32)}
INTERPRET_GRAD_WEIGHT = {"BLOCK_CO": 32, "BLOCK_CI": 32, "BLOCK_M": 64}

# db/dtop: a gather-sum, bandwidth-bound and without tl.dot; one fixed config everywhere.
GRAD_BIAS_TOP_META = {"BLOCK_TW": 32, "BLOCK_C": 64}
GRAD_BIAS_TOP_LAUNCH = {"num_warps": 4, "num_stages": 2}
INTERPRET_GRAD_BIAS_TOP = {"BLOCK_TW": 16, "BLOCK_C": 64}

# Autotuning. The key is (TUNE_KEY, COUT, CIN) plus the tensors' dtypes (triton adds those):
# COUT and CIN are fixed by the network, M = N*H*W changes with every image size a detector sees,
# so it enters the key only through its power-of-two bucket (a config is correct for any M; it was
# chosen for the bucket's first M). Each config is timed with a short benchmark (TUNE_WARMUP_MS,
# TUNE_REP_MS instead of triton's 25 / 100 ms). Compiling the configs for a new specialization
# (the divisibility of the integer arguments) is not shortened by either.
FWD_AUTOTUNE_KEY = ["TUNE_KEY", "COUT", "CIN"]
GRAD_WEIGHT_AUTOTUNE_KEY = ["TUNE_KEY", "COUT", "CIN"]
TUNE_WARMUP_MS = 5
TUNE_REP_MS = 25


def pixel_alignment(element_size: int, *values, multiple=None, whole_vectors: bool = False) -> int:
    """The kernels' PIX_ALIGN: the largest power of two, at most 16 bytes' worth of elements, that
    divides every value (the pixel count H * W and the batch / channel strides of the pixel-major
    operands); ``multiple(v, a)`` decides a divisibility when given (symbolic sizes), else v % a == 0.
    1 when every value is a multiple of 16: triton's JIT hints those itself, and the rewrite would
    weaken its hint to PIX_ALIGN (at P2's sizes, fp16 NCHW forward configs then spilled 48-128 B
    with triton 3.8.0). ``whole_vectors``: 1 unless PIX_ALIGN elements are 16 bytes (the weight
    gradient's: at P5's 2 for fp16 its 4-warp configs spilled more than with none, 632 B against
    384 B on sm_90 and 4536 B against 472 B on sm_80 with triton 3.8.0)."""
    multiple = multiple or (lambda v, a: v % a == 0)
    if all(multiple(v, 16) for v in values):
        return 1
    align = max(16 // element_size, 1)
    while align > 1 and not all(multiple(v, align) for v in values):
        align //= 2
    return 1 if whole_vectors and align * element_size < 16 else align


def narrow_pixel_loads(pix_align: int, hw, sn, sc, sw, flat: bool = True, multiple=None) -> bool:
    """True when the kernel loads an operand (x, or dy) of H * W = ``hw`` pixels and strides ``sn``,
    ``sc`` (batch, channel) and ``sw`` (w) one element at a time, with an address each: its channels
    are not contiguous (sc != 1: NCHW, or a view), and its pixels are not either (sw != 1, or its
    (h, w) do not flatten, ``flat`` False: X_FLAT / D_FLAT off, per-pixel h, w offsets) or the kernel
    knows no alignment of their runs: neither triton's hint (hw, sn, sc all multiples of 16) nor
    ``pix_align`` (the launch's PIX_ALIGN) > 1. Such a launch takes the NARROW_* config lists.
    ``multiple(v, a)`` decides a divisibility when given (symbolic sizes), else v % a == 0."""
    if sc == 1:
        return False
    if sw != 1 or not flat:
        return True
    multiple = multiple or (lambda v, a: v % a == 0)
    return pix_align == 1 and not all(multiple(v, 16) for v in (hw, sn, sc))


def tma_loads(element_size: int, n, h, w, sxn, sxc, sxh, sxw, cin, cout, swn, swk, aligned_bases: bool) -> bool:
    """True when the forward's x and W tiles can come through TMA descriptors (the TMA configs,
    ``_fwd_tma_descriptors``): x [n, cin, h, w] has unit channel stride and dense pixel rows (pixel
    m = (n, h, w) at m * sxw: sxh == w * sxw unless h == 1, sxn == h * w * sxw unless n == 1), rows
    that do not overlap (sxw >= cin; cin > 0: a descriptor has no empty dimension), W [cout, cin] is
    Cin-contiguous (swk == 1: the forward; dx's W^T is not, but for Cin == 1, where its row stride
    fails the next rule) with swn >= cin, both row strides (which the descriptors take whatever n, h
    and cout) are multiples of 16 bytes (the copy engine's rule), and both base addresses are
    16-byte aligned (``aligned_bases``: the caller's data_ptr). Plain ints (eager calls only)."""
    vec = max(16 // element_size, 1)
    return bool(aligned_bases and cin > 0 and sxc == 1 and swk == 1 and sxw >= cin and swn >= cin
                and (h == 1 or sxh == w * sxw) and (n == 1 or sxn == h * w * sxw)
                and sxw % vec == 0 and swn % vec == 0)


def tune_key(m: int, *unit_strides: bool) -> int:
    """The TUNE_KEY argument: 8 * log2(bucket) + layout bits, where bucket is the smallest power of
    two >= M (at least 16) and bit i is ``unit_strides[i]`` (forward: x's channel stride == 1,
    out's channel stride == 1, W's Cin stride == 1, which tells the forward from the backward's
    dx = dy . W^T; weight gradient: dy's and x's channel strides == 1)."""
    if len(unit_strides) > 3:
        raise ValueError(f"tune_key takes at most 3 layout bits, got {len(unit_strides)}")
    bits = sum(1 << i for i, unit in enumerate(unit_strides) if unit)
    return 8 * max(4, (max(int(m), 1) - 1).bit_length()) + bits


def tune_key_parts(key: int):
    """(bucket, bits) of a ``tune_key``: M's power-of-two bucket and the layout bits."""
    return 1 << (key // 8), key % 8


def _tuning_bench(kernel_call, quantiles):
    """The autotuner's timing of one config (triton.testing.do_bench with short warm-up/repeat)."""
    from triton.testing import do_bench
    return do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)


AUTOTUNE_ENV = "FUSED_FPN_TRITON_AUTOTUNE"


def autotune_enabled() -> bool:
    """False when FUSED_FPN_TRITON_AUTOTUNE is 0 / false / off / no: every launch then takes the first
    config of its list (no benchmarking, one compile per specialization instead of one per config;
    read at each launch)."""
    return _env_flag(AUTOTUNE_ENV, default=True)


_autotuned = {}


def _autotuner(name: str, kind: str, narrow: bool, kernel, configs, key):
    """triton.autotune(configs, key) of ``kernel``, built once per (name, kind, narrow, config list)
    and reused; with autotuning off, a one-config autotuner (triton runs a single config without
    benchmarking). One autotuner per kind: triton's key holds the tensors' dtypes but not ALLOW_TF32,
    so a config tuned for TF32 must not be reused for an exact fp32 call (nor the other way round)."""
    if not autotune_enabled():
        configs = configs[:1]
    cache_key = (name, kind, narrow, tuple(id(c) for c in configs))
    if cache_key not in _autotuned:   # setdefault: threads that race here all get the one stored autotuner
        tuner = triton.autotune(configs=configs, key=key, do_bench=_tuning_bench)(kernel)
        tuner.fused_fpn_name = name   # "fwd" or "dw": read by the launcher's descriptions of its choices
        tuner.fused_fpn_kind = kind
        tuner.fused_fpn_narrow = narrow
        tuner.fused_fpn_tma = any(c.kwargs.get("TMA") for c in configs)   # a TMA list: the launcher's allocator
        _autotuned.setdefault(cache_key, tuner)
    return _autotuned[cache_key]


def autotuned_fwd(arch: str, kind: str, narrow: bool = False, tma: bool = False, experimental=None,
                  resident_k: int = 0):
    """The forward kernel autotuned over ``fwd_configs`` (FWD_CONFIGS[(arch, kind)], plus the
    experimental configs with FUSED_FPN_TRITON_EXPERIMENTAL=1, the TMA ones among them when ``tma``:
    the launch's operands allow it, ``tma_loads``, and the weight-stationary ones for a reduction of
    ``resident_k`` channels when it is not 0; NARROW_FWD_CONFIGS[(arch, kind)] when ``narrow``),
    keyed on (TUNE_KEY = M's bucket + layout of x and out + weight orientation, COUT, CIN); dtype is
    part of the key too (triton's autotuner adds every tensor argument's dtype). The list's first
    config alone when ``autotune_enabled()`` is False. ``experimental``: the switch as the caller
    read it for this launch (``experimental_enabled()``, read here when None)."""
    if experimental is None:
        experimental = experimental_enabled()
    experimental = experimental and not narrow
    # the memo holds the table entries the list joins: one replaced since (a test's monkeypatch.setitem)
    # builds the autotuner again
    lists = _fwd_config_tables(arch, kind, experimental, narrow, tma, resident_k)
    memo_key = (arch, kind, narrow, experimental, experimental and tma, resident_k if experimental else 0,
                autotune_enabled())
    memo = _fwd_tuners.get(memo_key)
    if memo is not None and all(a is b for a, b in zip(memo[0], lists)):
        return memo[1]
    configs = fwd_configs(arch, kind, experimental=experimental, narrow=narrow, tma=tma, resident_k=resident_k)
    tuner = _autotuner("fwd", kind, narrow, _lateral_fwd_kernel, configs, FWD_AUTOTUNE_KEY)
    if len(_fwd_tuners) >= 4096:   # one entry per reduction size with the weight-stationary configs: bounded
        _fwd_tuners.clear()
    _fwd_tuners[memo_key] = (lists, tuner)
    return tuner


# autotuned_fwd's arguments (the switches read) -> (the config lists joined, the autotuner): a launch's
# config list, built and keyed by its configs' ids, took ~3 us of Python per launch (dev machine).
# The lists are compared by identity: replace a table's entry to change it, never edit a list in place.
_fwd_tuners: dict = {}


def autotuned_grad_weight(arch: str, kind: str, narrow: bool = False):
    """The weight-gradient kernel autotuned over ``grad_weight_configs(arch, kind, narrow)`` (as
    ``autotuned_fwd``)."""
    return _autotuner("dw", kind, narrow, _lateral_grad_weight_kernel, grad_weight_configs(arch, kind, narrow),
                      GRAD_WEIGHT_AUTOTUNE_KEY)
