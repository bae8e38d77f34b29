"""Shared set-up of the tests that check the CUDA backend without a GPU.

* ``cuda_build_skip_reason()``: why the CUDA kernels cannot be built here (None when they can).
* ``build_cuda_emu(build_dir, sanitize=False)``: the CPU emulation of the CUDA kernels (csrc/cuda/emu), whose
  ``lateral(x, w, bias, top, sm_count, tf32)`` and ``grad(dy, top_h, top_w)`` run the real host
  code of csrc/cuda/lateral_cuda.cpp and the kernels' logic on CPU tensors. conftest.py builds it
  once per session (fixture ``cuda_emu``; about 30 s on 2 cores).
* ``check_emulated_forward(emu, x, w, bias, top)``: its forward against the float64 reference
  (without a top: the host's route and the kernel, forced).
* ``one_element_off(t)``: t stored one element past a 16-byte boundary (strides unchanged);
  ``emu_input(shape, dtype, layout, gen)``: a random input in one of the matrices' layouts.
* ``emulate_module()``: csrc/cuda/emu/emulate.py itself (``asan_preload()``).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]


def nvcc_home() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def cuda_build_skip_reason() -> Optional[str]:
    if os.environ.get("FUSED_FPN_SKIP_CUDA_BUILD", "").strip().lower() in ("1", "true", "yes", "on"):
        return "FUSED_FPN_SKIP_CUDA_BUILD is set: the CUDA kernels were deliberately not built"
    if torch.version.cuda is None:
        return "torch is a CPU-only build: the CUDA kernels cannot be built"
    if nvcc_home() is None:
        return "nvcc not found: the CUDA kernels cannot be built"
    return None


def emulate_module():
    """csrc/cuda/emu/emulate.py, loaded once (its build() and asan_preload())."""
    global _EMULATE
    if _EMULATE is None:
        spec = importlib.util.spec_from_file_location("fused_fpn_emulate", REPO / "csrc" / "cuda" / "emu" / "emulate.py")
        _EMULATE = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_EMULATE)
    return _EMULATE


_EMULATE = None


def build_cuda_emu(build_dir: str, sanitize: bool = False):
    return emulate_module().build(build_dir, sanitize=sanitize)


def emu_input(shape, dtype, layout: str, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """A random [N, C, H, W] tensor in one of the emulated matrices' layouts: "nchw", "channels_last",
    "noncontig" (channels sliced, every other column), "cl_misaligned" (a channels_last view whose
    channel slice defeats 16-byte vectors by its strides and pointer) or "one_element_off"
    (channels_last, ``one_element_off``); drawn on the CPU, made on ``device`` (the same values)."""
    n, c, h, w = shape
    if layout == "noncontig":
        return torch.randn((n, c + 3, h, 2 * w + 1), generator=gen).to(device, dtype)[:, 1:c + 1, :, 1::2]
    if layout == "cl_misaligned":
        wide = torch.randn((n, c + 1, h, w), generator=gen).to(device, dtype)
        return wide.contiguous(memory_format=torch.channels_last)[:, 1:]
    t = torch.randn(shape, generator=gen).to(device, dtype)
    if layout == "nchw":
        return t
    t = t.contiguous(memory_format=torch.channels_last)
    return one_element_off(t) if layout == "one_element_off" else t


def one_element_off(t: torch.Tensor) -> torch.Tensor:
    """t's values with t's sizes and strides, stored one element past a 16-byte boundary: the strides
    allow 16-byte accesses, the pointer does not."""
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    storage = torch.empty(extent + 1, dtype=t.dtype, device=t.device)
    assert storage.data_ptr() % 16 == 0
    out = storage.as_strided(t.shape, t.stride(), 1)
    out.copy_(t)
    return out


def check_emulated_forward(emu, x, weight, bias, top, sm_count: int = 132, tf32: bool = False) -> torch.Tensor:
    """The emulated CUDA forward on these inputs: shape, dtype, x's memory format, every element
    written (outputs are NaN-poisoned), values within the dtype's tolerance of the float64 reference.
    Without a top both routes are checked: the host code's own (conv2d for dense x, see
    runs_as_convolution in lateral_cuda.cpp) and the kernel, forced; the host route's output is returned."""
    from fused_fpn._layout import output_memory_format
    from fused_fpn.reference import lateral_reference
    from fpn_testing import TOLERANCES

    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = lateral_reference(d(x), d(weight), d(bias), d(top))
    atol, rtol = TOLERANCES[x.dtype]
    outs = [emu.lateral(x, weight, bias, top, sm_count, tf32, topless_conv=route) for route in
            ((True, False) if top is None else (True,))]
    for out in outs:
        assert out.shape == (x.shape[0], weight.shape[0], x.shape[2], x.shape[3]) and out.dtype == x.dtype
        assert out.is_contiguous(memory_format=output_memory_format(x))
        assert not torch.isnan(out).any(), "an output element was not written (or read unwritten shared memory)"
        torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    return outs[0]
