"""Size limits of the Triton kernels (no triton import: the backend checks them before loading it).

The kernels index pixels (m = (n, h, w) < M = N*H*W) in int32 and element offsets in int64. The
largest pixel index any kernel forms is below M + 2^20: a forward row tile ends before M + BLOCK_M
(BLOCK_M <= 256), and weight-gradient split s spans pixels [s * rows, (s + 1) * rows) with
split * rows <= M + 256 * split (``lateral_launch._grad_weight_split``: rows is M / split rounded up
to 256, split <= MAX_GRAD_WEIGHT_SPLIT), plus a BLOCK_M tail. So M <= MAX_PIXELS keeps all of them
below 2^31.

A CUDA grid takes up to MAX_PROGRAMS programs in x (program ids stay int32) but only 65535 in y and
z: the only 2-D grid is the weight gradient's (tiles, split), split <= MAX_GRAD_WEIGHT_SPLIT; the
bias / top gradient flattens its (row, channel block) programs into x and checks the count.
"""
MAX_GRAD_WEIGHT_SPLIT = 2048
MAX_PIXELS = 2**31 - 2**20
MAX_PROGRAMS = 2**31 - 1
