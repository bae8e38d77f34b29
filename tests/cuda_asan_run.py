"""The emulated CUDA kernels (csrc/cuda/emu) under AddressSanitizer: run by
tests/test_cuda_build.py::test_emulated_kernels_stay_inside_their_tensors_under_address_sanitizer in a
python started with gcc's ASan runtime in LD_PRELOAD (the module cannot load into pytest's own process).

    python tests/cuda_asan_run.py BUILD_DIR cases    # the forward / backward matrix; prints "ran N cases"
    python tests/cuda_asan_run.py BUILD_DIR canary   # one element read just past a tensor: ASan must abort

The emulation checks its 16-byte, ldmatrix and WMMA accesses itself (emu::access_ok); the element
accesses (odd channel counts, strided views, the gathers of NCHW top maps, the backward's loops) are
plain C++ reads and writes that only ASan checks, against the bounds of each tensor's allocation: an
access past the end of x, the weight, the bias, top, dy, the output or a workspace aborts the process
with a "heap-buffer-overflow" report. So the inputs here are allocated exactly (no slack storage
around them) except for the views that need it.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_emu_testing import build_cuda_emu, check_emulated_forward, emu_input  # noqa: E402

MATHS = [(torch.float16, False), (torch.bfloat16, False), (torch.float32, False), (torch.float32, True)]
# (N, Cin, Cout, H, W, Ht, Wt): element paths (odd channels), 16-byte paths, downsampling
SIZES = [(2, 3, 17, 7, 9, 4, 5), (1, 40, 24, 6, 8, 3, 4), (1, 16, 8, 3, 10, 5, 13)]
SPLIT_K = (1, 256, 24, 5, 7, 3, 4)  # with 1000 SMs the host picks split-K: the fp32 workspace
LAYOUTS = ["nchw", "channels_last", "noncontig", "one_element_off"]  # cuda_emu_testing.emu_input
GRAD_SIZES = [(2, 5, 7, 9, 4, 5), (1, 3, 5, 6, 10, 13), (1, 3, 4, 5, 0, 0)]  # (N, C, H, W, Ht, Wt)
# Small, and NCHW dy in one dtype only: ASan makes each of the emulation's threads (one per CUDA
# thread) costly to start, and the NCHW backward runs a block per (row group, channel, image).


def forward_cases():
    """(size, dtype, tf32, layout, with bias and top, SM count) of every forward the run checks."""
    return [(size, dtype, tf32, layout, extras, 1000 if size == SPLIT_K else 132)
            for dtype, tf32 in MATHS for size in SIZES + [SPLIT_K]
            for layout in (LAYOUTS if size != SPLIT_K else ["nchw", "channels_last"]) for extras in (True, False)]


def grad_cases():
    """(dy's shape, top's size, dtype, layout) of every db + dtop the run checks."""
    return [((n, c, h, w), (th, tw), dtype, layout)
            for dtype in (torch.float16, torch.bfloat16, torch.float32) for n, c, h, w, th, tw in GRAD_SIZES
            for layout in (("nchw", "channels_last", "noncontig") if dtype == torch.float32 else ("channels_last",))]


def run_cases(emu) -> int:
    """Each case against the float64 reference (check_emulated_forward: shape, layout, every element
    written, tolerance; both routes without a top); returns how many ran."""
    from fused_fpn.reference import lateral_grad_bias_top_reference
    from fpn_testing import TOLERANCES

    ran = 0
    gen = torch.Generator().manual_seed(0)
    for (n, cin, cout, h, w, th, tw), dtype, tf32, layout, extras, sms in forward_cases():
        x = emu_input((n, cin, h, w), dtype, layout, gen)
        weight = (torch.randn((cout, cin), generator=gen) / cin ** 0.5).to(dtype)
        bias = torch.randn((cout,), generator=gen).to(dtype) if extras else None
        top = emu_input((n, cout, th, tw), dtype, layout, gen) if extras else None
        check_emulated_forward(emu, x, weight, bias, top, sm_count=sms, tf32=tf32)
        ran += 1
    for shape, (th, tw), dtype, layout in grad_cases():
        dy = emu_input(shape, dtype, layout, gen)
        db, dtop = emu.grad(dy, th, tw)
        rdb, rdtop = lateral_grad_bias_top_reference(dy.double(), th, tw)
        atol, rtol = TOLERANCES[dtype]
        assert dtop.shape == (shape[0], shape[1], th, tw)
        torch.testing.assert_close(db.double(), rdb, atol=atol, rtol=rtol)
        torch.testing.assert_close(dtop.double(), rdtop, atol=atol, rtol=rtol)
        ran += 1
    return ran


def main(build_dir: str, mode: str) -> None:
    emu = build_cuda_emu(build_dir, sanitize=True)
    if mode == "canary":
        t = torch.zeros(10, dtype=torch.float32)
        emu.probe("element read", t, t.nbytes - 1)  # the last byte: allowed
        print("last byte read", flush=True)
        emu.probe("element read", t, t.nbytes)      # one past the end: ASan aborts here
        print("read past the end not caught", flush=True)
        return
    print(f"ran {run_cases(emu)} cases", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
