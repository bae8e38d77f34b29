"""Triton kernels of fused_fpn, installed as ``fused_fpn.kernels`` (never as a top-level module)."""
