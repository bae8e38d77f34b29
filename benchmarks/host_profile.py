"""Where the host time of a training step goes on a GPU, beyond what ``launch_overhead.py`` shows:

    python benchmarks/host_profile.py [--calls 300] [--budget-s 100]

1. The triton backend's pieces, tiny map (x [1, 8, 4, 4], top [1, 8, 2, 2]), host time per call:
   the launchers of ``fused_fpn/kernels/lateral_launch.py`` called as the registered ops call them
   (wrap_triton's HOP dispatch off, as in ``torch.library.triton_op``'s eager path), the registered
   ops, and the autograd backward, so the cost of each layer is a difference of two rows.
2. cProfile of the registered triton forward and backward ops (main thread), top functions by own time.
3. torch.profiler of the whole FPN's forward + backward on tiny maps (channels 8/16/24/32 -> 8):
   torchvision, then each fused backend: the ops with the most host time, and the number of kernel
   launches per step.

A diagnostic for the GPU machine (it needs CUDA), not a benchmark: ``pytest benchmarks`` is that.
Sections stop being started once ``--budget-s`` seconds have passed (first calls compile Triton kernels).
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import sys
import time

import torch

import fused_fpn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from launch_overhead import no_hop, time_per_call, tiny_fpn, tiny_lateral_case  # noqa: E402


def triton_pieces(calls: int) -> None:
    from fused_fpn.backends import triton as tb
    from fused_fpn.kernels import lateral_launch as L
    dt = torch.float16
    x, w, b, top = tiny_lateral_case("cuda", dt)
    grad = torch.randn((1, 8, 4, 4), generator=torch.Generator().manual_seed(2)).to("cuda", dt)
    dx_out = torch.empty_like(x)
    xg = x.clone().requires_grad_()
    fwd, bwd = tb.ops()

    def in_op(fn):
        return lambda: no_hop(fn)

    rows = {
        "launcher: lateral_forward": in_op(lambda: L.lateral_forward(x, w, b, top)),
        "launcher: dx (gemm_epilogue, W^T)": in_op(lambda: L.gemm_epilogue(grad, w.t(), None, None, dx_out)),
        "launcher: dW (grad_weight)": in_op(lambda: L.grad_weight(grad, x, dt)),
        "launcher: db + dtop (grad_bias_top)": in_op(lambda: L.grad_bias_top(grad, 2, 2, True)),
        "launcher: lateral_backward (all four)": in_op(
            lambda: L.lateral_backward(grad, x, w, 2, 2, True, True, True, True)),
        "torch: [3, 8, 8] fp32 sum(0).to(fp16)": lambda: torch.empty((3, 8, 8), device="cuda").sum(0).to(dt),
        "op: triton_lateral": lambda: fwd(x, w, b, top),
        "op: triton_lateral_backward": lambda: bwd(grad, x, w, 2, 2, True, True, True, True),
        "autograd: forward, requires_grad": lambda: fused_fpn.lateral(xg, w, b, top, backend="triton"),
        "autograd: forward + backward": lambda: fused_fpn.lateral(xg, w, b, top, backend="triton").sum().backward(),
    }
    print("1. triton pieces, host time per call (fp16, x [1, 8, 4, 4])")
    for name, fn in rows.items():
        try:
            print(f"  {name:<45s} {time_per_call(fn, 'cuda', calls):9.1f} us")
        except Exception as exc:  # noqa: BLE001 - a diagnostic reports and goes on
            print(f"  {name:<45s}  ERROR {type(exc).__name__}: {exc}"[:200])

    print("\n2. cProfile of the registered triton ops (main thread), top 18 by own time")
    for name in ("op: triton_lateral", "op: triton_lateral_backward"):
        fn = rows[name]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        text = s.getvalue()
        start = text.find("ncalls")
        print(f"  -- {name}, {calls} calls\n" + text[max(start, 0):].rstrip())


def fpn_profiles(budget_end: float) -> None:
    from torch.profiler import ProfilerActivity, profile
    tv, feats = tiny_fpn("cuda", torch.float16)
    for t in feats.values():
        t.requires_grad_()
    models = [("torchvision", tv)]
    for name in ("cuda", "triton"):
        if name in fused_fpn.available_backends("cuda"):
            models.append((name, fused_fpn.FPN.from_torchvision(copy.deepcopy(tv), backend=name)))
    print("\n3. torch.profiler, FPN forward + backward on tiny maps (fp16), 20 steps after warm-up")
    for name, model in models:
        if time.monotonic() > budget_end:
            print(f"  -- {name}: skipped (time budget used up)")
            continue

        def step():
            sum(o.sum() for o in model(feats).values()).backward()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                             "cudaLaunchKernelExC"))
        print(f"  -- {name}: {launches / 20:.1f} kernel launches per step")
        print(events.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--budget-s", type=float, default=100.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_profile.py needs a CUDA device", file=sys.stderr)
        return 2
    budget_end = time.monotonic() + args.budget_s
    print(f"host profile, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if "triton" in fused_fpn.available_backends("cuda"):
        triton_pieces(args.calls)
    fpn_profiles(budget_end)
    return 0


if __name__ == "__main__":
    sys.exit(main())
