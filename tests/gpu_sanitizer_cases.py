"""The fused lateral op on small, odd cases, forward and backward, for NVIDIA's compute-sanitizer:
run by benchmarks/gpu_run.sh's ``sanitize`` step, once plainly (values checked, and Triton's kernels
compiled into its cache) and then under each tool (memcheck: out-of-bounds and misaligned accesses to
global, local and shared memory, and hardware exceptions; racecheck: shared-memory hazards between
threads; synccheck: barriers used wrongly).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 python tests/gpu_sanitizer_cases.py [--backends cuda,triton]

PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own cudaMalloc, whose exact bounds memcheck
knows; torch's caching allocator carves tensors out of larger blocks, where an overrun lands in a
neighbour unseen. The cases are the emulated matrices' (tests/cuda_asan_run.py, which runs the CUDA
kernels' emulation under AddressSanitizer on a CPU): odd channel counts, 16-byte paths, nearest
downsampling, a shape that takes the CUDA kernel's split-K workspace on a GPU, and x and top in NCHW,
channels_last, strided (``noncontig``) and one element off 16 bytes, made on the device. Each output and
gradient is checked against the float64 reference, with new memory filled with NaN
(``fpn_testing.nan_poisoned``, as the test suite's ``nan_poison``: on a GPU as on the CPU), so that an element never written fails. The first line names the backends and device;
each case prints a line before it runs, so a report in the sanitizer's log is read against the case
above it; a case that fails prints FAILED and the run goes on (the last line is "ran N cases, F failed",
F of the N; exit status 1 if F > 0), except after a CUDA error, which leaves the context unusable: the
run stops there.
``--shard K/S`` runs every S-th case from the K-th (the plain run is S processes at once: Triton
compiles each new specialization on the main thread, about 90 of them here).
Triton runs the 2- and 4-byte paths (fp16, and fp32 with TF32): bf16 and exact fp32 load and store
alike and would only add compiles; the CUDA kernels, compiled ahead, run all four. Triton takes each
list's first config (run as a script, FUSED_FPN_TRITON_AUTOTUNE=0 unless set: autotuning would time
every config under the tool); tests/test_triton_gpu.py runs every config alone.

On a CPU (``--device cpu --backends cpu,torch``) the same cases check this script itself
(tests/test_gpu_run_script.py).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator, NamedTuple, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fused_fpn  # noqa: E402
from cuda_asan_run import GRAD_SIZES, LAYOUTS, MATHS, SIZES, SPLIT_K  # noqa: E402
from cuda_emu_testing import emu_input  # noqa: E402
from fpn_testing import TOLERANCES, backend_supports, nan_poisoned  # noqa: E402
from fused_fpn._layout import output_memory_format  # noqa: E402
from fused_fpn.reference import lateral_reference  # noqa: E402

TRITON_MATHS = [(torch.float16, False), (torch.float32, True)]


class Case(NamedTuple):
    size: Tuple[int, ...]   # (N, Cin, Cout, H, W, Ht, Wt)
    dtype: torch.dtype
    tf32: bool
    layout: str             # cuda_emu_testing.emu_input's, for x and top
    extras: bool            # bias and top present
    backward: bool          # also every gradient

    def describe(self, backend: str) -> str:
        math = "tf32" if self.tf32 else str(self.dtype).replace("torch.", "")
        extras = "bias+top" if self.extras else "no bias/top"
        return f"{backend} {math} {self.layout} {self.size} {extras}{' +backward' if self.backward else ''}"


def cases(backend: str, device: str) -> Iterator[Case]:
    """The cases ``backend`` runs on ``device``: every forward of the emulated matrix in its dtypes, the
    backward where bias and top are present (the first two sizes and the split-K shape)."""
    maths = TRITON_MATHS if backend == "triton" else MATHS
    for dtype, tf32 in maths:
        if (tf32 and device == "cpu") or backend_supports(backend, device, dtype) is not None:
            continue
        for size in SIZES + [SPLIT_K]:
            for layout in (LAYOUTS if size != SPLIT_K else ["nchw", "channels_last"]):
                for extras in (True, False):
                    yield Case(size, dtype, tf32, layout, extras, extras and size in (SIZES[0], SIZES[1], SPLIT_K))


def _tolerance(dtype: torch.dtype, tf32: bool) -> Tuple[float, float]:
    return TOLERANCES[torch.float16 if tf32 else dtype]   # TF32 keeps fp16's 10-bit mantissa


def _scale(ref: torch.Tensor) -> float:
    """A sum's absolute tolerance factor: its largest element (at least 1; 1 for an empty one)."""
    return max(1.0, ref.abs().max().item()) if ref.numel() else 1.0


def run_case(case: Case, backend: str, device: str, gen: torch.Generator) -> None:
    """One case: forward (and backward) of ``backend`` against the float64 reference."""
    n, cin, cout, h, w, th, tw = case.size
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = case.tf32
    x = emu_input((n, cin, h, w), case.dtype, case.layout, gen, device)
    weight = (torch.randn((cout, cin), generator=gen) / cin ** 0.5).to(device=device, dtype=case.dtype)
    bias = torch.randn((cout,), generator=gen).to(device=device, dtype=case.dtype) if case.extras else None
    top = emu_input((n, cout, th, tw), case.dtype, case.layout, gen, device) if case.extras else None
    inputs = [t for t in (x, weight, bias, top) if t is not None]
    for t in inputs:
        t.requires_grad_(case.backward)
    out = fused_fpn.lateral(x, weight, bias, top, backend=backend)
    d64 = [t.detach().double().requires_grad_(case.backward) for t in inputs]
    ref = lateral_reference(*d64[:2], *(d64[2:] if case.extras else []))
    atol, rtol = _tolerance(case.dtype, case.tf32)
    assert out.shape == (n, cout, h, w) and out.dtype == case.dtype, (out.shape, out.dtype)
    assert out.is_contiguous(memory_format=output_memory_format(x)), out.stride()
    assert not torch.isnan(out).any(), "an output element was not written"
    torch.testing.assert_close(out.detach().double(), ref.detach(), atol=atol, rtol=rtol)
    if not case.backward:
        return
    grad = torch.randn(out.shape, generator=gen).to(device=device, dtype=case.dtype)
    grads = torch.autograd.grad(out, inputs, grad)
    refs = torch.autograd.grad(ref, d64, grad.double())
    for name, g, r in zip(("x", "weight", "bias", "top"), grads, refs):
        assert g.shape == r.shape and not torch.isnan(g).any(), f"d{name}: {g.shape}, NaN: {torch.isnan(g).any()}"
        torch.testing.assert_close(g.double(), r, atol=atol * _scale(r), rtol=rtol,   # a sum: scaled
                                   msg=lambda m, name=name: f"d{name}: {m}")


class GradCase(NamedTuple):
    """fused_fpn::lateral_grad_bias_top (the db + dtop kernel) alone, on a dy the forward's gradients do
    not make (tests/cuda_asan_run.py's GRAD_SIZES: a top larger than dy, an empty top)."""
    size: Tuple[int, ...]   # (N, C, H, W, Ht, Wt)
    dtype: torch.dtype
    layout: str

    def describe(self, backend: str) -> str:
        return f"grad {backend} {str(self.dtype).replace('torch.', '')} {self.layout} {self.size}"


def grad_cases(backend: str, device: str) -> Iterator[GradCase]:
    """The op's own db + dtop kernels (cuda, cpu); triton's runs in the backward cases."""
    if backend not in ("cuda", "cpu"):
        return
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        if backend_supports(backend, device, dtype) is None:
            for size in GRAD_SIZES:
                for layout in ("nchw", "channels_last", "noncontig"):
                    yield GradCase(size, dtype, layout)


def run_grad_case(case: GradCase, device: str, gen: torch.Generator) -> None:
    from fused_fpn.reference import lateral_grad_bias_top_reference
    n, c, h, w, th, tw = case.size
    dy = emu_input((n, c, h, w), case.dtype, case.layout, gen, device)
    db, dtop = torch.ops.fused_fpn.lateral_grad_bias_top(dy, th, tw)
    rdb, rdtop = lateral_grad_bias_top_reference(dy.double(), th, tw)
    atol, rtol = TOLERANCES[case.dtype]
    assert dtop.shape == rdtop.shape and not torch.isnan(dtop).any() and not torch.isnan(db).any()
    torch.testing.assert_close(db.double(), rdb, atol=atol * _scale(rdb), rtol=rtol)
    torch.testing.assert_close(dtop.double(), rdtop, atol=atol * _scale(rdtop), rtol=rtol)


def _shard(text: str) -> Tuple[int, int]:
    k, _, s = text.partition("/")
    try:
        k, s = int(k), int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must be K/S with integers 0 <= K < S, got {text!r}") from None
    if not 0 <= k < s:
        raise argparse.ArgumentTypeError(f"--shard must be K/S with integers 0 <= K < S, got {text!r}")
    return k, s


# A CUDA error leaves the context unusable (every later call fails the same way): the run stops there.
STICKY_CUDA_ERRORS = ("CUDA error", "illegal memory access", "misaligned address", "unspecified launch failure",
                      "an illegal instruction")


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default="cuda,triton", help="comma list (default: cuda,triton)")
    parser.add_argument("--shard", type=_shard, default=(0, 1), help="K/S: every S-th case from the K-th")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU: nothing to sanitize (--device cpu checks the cases themselves)", flush=True)
        return 1
    if args.device == "cuda" and os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1":
        print("warning: PYTORCH_NO_CUDA_MEMORY_CACHING is not 1: memcheck cannot see overruns inside the "
              "caching allocator's blocks", flush=True)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for backend in backends:
        if backend not in fused_fpn.available_backends(args.device):
            print(f"backend {backend} cannot run on {args.device} here: "
                  f"{fused_fpn.available_backends(args.device)}", flush=True)
            return 1
    print(f"backends: {','.join(backends)} on {args.device}", flush=True)
    shard, shards = args.shard
    work = [(backend, case) for backend in backends
            for case in [*cases(backend, args.device), *grad_cases(backend, args.device)]]
    ran = failed = 0
    with nan_poisoned(), _tf32_restored():
        for i, (backend, case) in enumerate(work):
            if i % shards != shard:
                continue
            ran += 1
            try:
                print(f"case {case.describe(backend)}", flush=True)
                gen = torch.Generator().manual_seed(i)   # the same inputs whatever the sharding
                if isinstance(case, GradCase):
                    run_grad_case(case, args.device, gen)
                else:
                    run_case(case, backend, args.device, gen)
                if args.device == "cuda":
                    torch.cuda.synchronize()   # a fault is the case's, not the next one's
            except Exception as exc:  # noqa: BLE001 - reported, and the run goes on
                failed += 1
                print(f"FAILED {case.describe(backend)}: {type(exc).__name__}: {str(exc)[:600]}", flush=True)
                if any(s in str(exc) for s in STICKY_CUDA_ERRORS):
                    print("a CUDA error: the context is unusable, stopping", flush=True)
                    break
    print(f"ran {ran} cases, {failed} failed", flush=True)
    return 1 if failed else 0


@contextlib.contextmanager
def _tf32_restored():
    """The TF32 flags as they were before the cases (run_case sets them per case)."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


if __name__ == "__main__":
    os.environ.setdefault("FUSED_FPN_TRITON_AUTOTUNE", "0")   # read at each launch
    sys.exit(main())
