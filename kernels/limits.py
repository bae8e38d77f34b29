"""Size limits of the Triton kernels (no triton import: the backend checks them before loading it).

The kernels index pixels (m = (n, h, w) < M = N*H*W) in int32 and element offsets in int64. The
largest pixel index any kernel forms is below M + 2^20: a forward row tile ends before M + BLOCK_M
(BLOCK_M <= 256), and weight-gradient split s spans pixels [s * rows, (s + 1) * rows) with
split * rows <= M + 256 * split (``lateral_launch._grad_weight_split``: rows is M / split rounded up
to 256, split <= MAX_GRAD_WEIGHT_SPLIT), plus a BLOCK_M tail. So M <= MAX_PIXELS keeps all of them
below 2^31.
"""
MAX_GRAD_WEIGHT_SPLIT = 2048
MAX_PIXELS = 2**31 - 2**20
