"""Triton kernels of fused_fpn, installed as ``fused_fpn.kernels`` (never as a top-level module).

    lateral_kernels  the raw @triton.jit kernels (forward GEMM + bias + nearest gather-add epilogue,
                     weight gradient, fused bias/top gradient) and their autotune configs
    lateral_launch   launchers: allocation, strides, grids, configs (the bodies of the registered
                     ``fused_fpn::triton_*`` ops, see ``fused_fpn/backends/triton.py``)
    limits           the pixel-count limit of the kernels' int32 pixel indices (no triton import)
    aot              ahead-of-time compile of every config for sm_90 / sm_80 without a GPU

Importing this package does not import triton; its submodules do.
"""
