"""Host time per call of the lateral op, layer by layer: where a Python caller's time goes when the
GPU is not the bottleneck.

    python benchmarks/launch_overhead.py [--device cuda|cpu] [--calls 2000] [--json FILE] [--stub-triton-launch]

Every row calls one layer of the stack on a tiny problem (x [1, 8, 4, 4], top [1, 8, 2, 2]) back to
back ``--calls`` times and reports the wall time per call (median of 5 repeats, the device
synchronized before and after each repeat). The kernels take a few microseconds, so on a GPU the
figures are the host cost of enqueueing (argument checks, dispatcher, autograd, Triton's launcher);
subtracting two rows gives the cost of one layer. Rows, from the bottom of the stack up:

    triton: JIT kernel, fixed config      _lateral_fwd_kernel[grid](...) with one config (GPU only)
    triton: autotuned kernel              lateral_launch.gemm_epilogue (config lookup + device guard),
                                          run as the op runs it (wrap_triton's HOP dispatch off): after
                                          the first call, the eager fast path (the JIT function with
                                          the config the autotuner chose)
    triton: ..., Autotuner.run            the same through triton's Autotuner.run at every call
    triton: registered op                 torch.ops.fused_fpn.triton_lateral (triton_op dispatch)
    <backend>: fused_fpn.lateral          the public function (checks, backend selection; triton: the
                                          op's body without the dispatcher, a plain eager call)
    <backend>: ... requires_grad          the same with x requiring grad (autograd node recorded;
                                          triton: through the registered op)
    <backend>: forward + backward         one forward and one backward
    ..., binary launch                    triton: the same row with FUSED_FPN_TRITON_EXPERIMENTAL=1 (set
                                          for the whole row): a launch made before runs its kept
                                          binary, without JITFunction.run (lateral_launch._launch_binary)
    ..., experimental switch, JIT launch  the same switch with lateral_launch.BINARY_LAUNCH off: its
                                          configs' host cost, each launch through the JIT (the
                                          binary launches' saving is this row minus the one above)
    cuda / cpu: registered op             torch.ops.fused_fpn.lateral (the C++ op)
    eager: conv2d + interpolate + add     torchvision's unfused computation, for scale
    FPN torchvision / FPN <backend>       the whole module on tiny maps (4 levels + max-pool level),
                                          no grad, and forward + backward

With ``--device cpu --stub-triton-launch`` under TRITON_INTERPRET=1, rows "triton launcher, JIT
stubbed: ..." time the Triton launchers' own Python on this machine, and rows "triton, JIT stubbed:
..." the layers above them (registered op, fused_fpn.lateral, its autograd, forward + backward), with
every Triton launch stubbed out (``stubbed_launcher_rows``).

It is a diagnostic, not a benchmark of the kernels (``pytest benchmarks`` is that): run it on the
GPU machine to see which layer to cut. On CPU tensors the Triton rows are skipped (the interpreter).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import fused_fpn


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_per_call(fn: Callable[[], object], device: str, calls: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the wall time of ``calls`` back-to-back calls, in microseconds per call."""
    for _ in range(max(10, calls // 20)):
        fn()
    per_call = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(per_call)


def no_hop(fn: Callable[[], object]) -> object:
    """fn() as in a registered op's eager body (``lateral_launch.as_in_the_op_body``: wrap_triton
    returns the kernel itself, not a higher-order op)."""
    from fused_fpn.kernels import lateral_launch as L
    with L.as_in_the_op_body():
        return fn()


BINARY = ", binary launch"   # rows timed with FUSED_FPN_TRITON_EXPERIMENTAL=1 (``experimental_switch``)
SWITCH_JIT = ", experimental switch, JIT launch"   # ... and lateral_launch.BINARY_LAUNCH off


def experimental_variants(rows: Dict[str, Callable[[], object]], *names: str) -> None:
    """Add each of ``names``' ``BINARY`` and ``SWITCH_JIT`` rows (the same call) to ``rows``."""
    for name in names:
        rows[name + SWITCH_JIT] = rows[name + BINARY] = rows[name]


@contextlib.contextmanager
def experimental_switch(row: str):
    """While a ``BINARY`` or ``SWITCH_JIT`` row is timed: FUSED_FPN_TRITON_EXPERIMENTAL=1 (set once for
    the whole row, not per call, whose host time it would add), with ``SWITCH_JIT`` also
    lateral_launch.BINARY_LAUNCH off; both restored after it. Nothing for other rows."""
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    if not row.endswith((BINARY, SWITCH_JIT)):
        yield
        return
    old, old_binary = os.environ.get(K.EXPERIMENTAL_ENV), L.BINARY_LAUNCH
    os.environ[K.EXPERIMENTAL_ENV] = "1"
    L.BINARY_LAUNCH = row.endswith(BINARY)
    try:
        yield
    finally:
        L.BINARY_LAUNCH = old_binary
        if old is None:
            del os.environ[K.EXPERIMENTAL_ENV]
        else:
            os.environ[K.EXPERIMENTAL_ENV] = old


class _StubBinary:
    """What the stubbed JIT returns: a binary whose launcher does nothing (kept by the binary launches)."""
    function = packed_metadata = None

    def launch_metadata(self, *args):
        return None

    def run(self, *args):
        return None


def without_fast_launch(fn: Callable[[], object]) -> object:
    """fn() with the launcher's eager fast path off: every autotuned launch through Autotuner.run."""
    from fused_fpn.kernels import lateral_launch as L
    L.FAST_LAUNCH = False
    try:
        return fn()
    finally:
        L.FAST_LAUNCH = True


def stubbed_launcher_rows(dtype: torch.dtype) -> Dict[str, Callable[[], object]]:
    """CPU only, with the Triton interpreter active: the triton backend's own host time on this
    machine, with triton's JIT launch itself stubbed out (``JITFunction.run`` returns at once) and the
    launcher on its compiled-kernel branch (sm90 config lists, autotuning off). What is left is the
    Python around the launch: arguments (the launch plan, ``lateral_launch.launch_plan``), allocation,
    the autotuner lookup, and either Autotuner.run (rebuilding its key from the ~30 arguments) or the
    eager fast path; then the same through the registered op (a ``custom_op`` under the interpreter,
    where a GPU has a ``triton_op``), the public function, its autograd, and a forward + backward
    (dx, dW, db + dtop launches stubbed too). The launch skipped here took ~37 us on the H200
    machine's host (row "triton: JIT kernel, fixed config", 2026-11-30). The stubbed JIT returns a
    binary that does nothing, which the ``BINARY`` rows then launch (the launcher's binary path)."""
    from fused_fpn.backends import triton as tb
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    x, w, b, top = tiny_lateral_case("cpu", dtype)
    xg = x.clone().requires_grad_()
    out = torch.empty((1, 8, 4, 4), dtype=dtype)
    grad = torch.ones_like(out)
    L.interpreting = lambda: False
    L._device_facts = lambda device: ("sm90", 132)
    os.environ[K.AUTOTUNE_ENV] = "0"
    L._current_stream = lambda device: 0   # no driver without a GPU: the binary launches' stream
    for kernel in (K._lateral_fwd_kernel, K._lateral_grad_weight_kernel, K._lateral_grad_bias_top_kernel):
        kernel.run = lambda *args, **kwargs: _StubBinary()   # the autotuners' .fn; kernel[grid](...) calls .run
    fwd = lambda: no_hop(lambda: L.gemm_epilogue(x, w, b, top, out))       # noqa: E731  (as in the op)
    dw = lambda: no_hop(lambda: L.grad_weight(grad, x, w.dtype))           # noqa: E731
    op = tb.ops()[0]
    rows = {
        "triton launcher, JIT stubbed: forward": fwd,
        "triton launcher, JIT stubbed: forward, Autotuner.run": lambda: without_fast_launch(fwd),
        "triton launcher, JIT stubbed: dW": dw,
        "triton launcher, JIT stubbed: dW, Autotuner.run": lambda: without_fast_launch(dw),
        # no_hop around the op too: a triton_op's eager body turns wrap_triton's higher-order op off, the
        # interpreter's custom_op does not (torch 2.11's wrap_triton then refuses an interpreted kernel)
        "triton, JIT stubbed: registered op": lambda: no_hop(lambda: op(x, w, b, top)),
        "triton, JIT stubbed: fused_fpn.lateral":
            lambda: no_hop(lambda: fused_fpn.lateral(x, w, b, top, backend="triton")),
        "triton, JIT stubbed: ..., requires_grad":
            lambda: no_hop(lambda: fused_fpn.lateral(xg, w, b, top, backend="triton")),
        "triton, JIT stubbed: forward + backward":
            lambda: no_hop(lambda: fused_fpn.lateral(xg, w, b, top, backend="triton").sum().backward()),
    }
    experimental_variants(rows, "triton, JIT stubbed: fused_fpn.lateral", "triton, JIT stubbed: forward + backward")
    return rows


def stand_in_sm90_rows() -> Dict[str, Callable[[], object]]:
    """CPU, TRITON_INTERPRET unset: the Triton launchers with triton's real JIT compiling for sm_90
    and a stand-in driver whose binaries' launchers do nothing (tests/binary_launch_contract.py), on
    fp16 channels_last x [2, 64, 8, 12], W [32, 64], bias, top [2, 32, 4, 6]: the launchers' host time
    with JITFunction.run (specialization, cache key) at every launch, against the ``BINARY`` rows' kept
    binaries, on this machine; all but the driver's own launch call (the same either way)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
    import binary_launch_contract as C
    from fused_fpn.kernels import lateral_launch as L
    C.use_stand_in_driver()
    C._RecordingLauncher.record = False
    cl = dict(dtype=torch.float16, memory_format=torch.channels_last)
    x, top, grad = (torch.randn(shape).to(**cl) for shape in ((2, 64, 8, 12), (2, 32, 4, 6), (2, 32, 8, 12)))
    w, b = torch.randn(32, 64, dtype=torch.float16), torch.randn(32, dtype=torch.float16)
    out = torch.empty(2, 32, 8, 12).to(**cl)
    forward = lambda: L.run_directly(L.gemm_epilogue, x, w, b, top, out)   # noqa: E731
    backward = lambda: L.run_directly(L.lateral_backward, grad, x, w, 4, 6, True, True, True, True)   # noqa: E731
    name = "triton launcher, stand-in sm_90 JIT: "
    rows = {name + "forward": forward, name + "backward (dx, dW, db + dtop)": backward}
    experimental_variants(rows, *rows)
    return rows


def tiny_lateral_case(device: str, dtype: torch.dtype):
    """(x [1, 8, 4, 4], weight [8, 8], bias [8], top [1, 8, 2, 2]): the diagnostics' tiny problem."""
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=g).to(device, dtype)
                 for shape in ((1, 8, 4, 4), (8, 8), (8,), (1, 8, 2, 2)))


def tiny_fpn(device: str, dtype: torch.dtype):
    """(torchvision FeaturePyramidNetwork [8, 16, 24, 32] -> 8 with LastLevelMaxPool, its input
    OrderedDict of maps 8x8 .. 1x1): the diagnostics' whole-module problem."""
    from collections import OrderedDict
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    channels = [8, 16, 24, 32]
    tv = FeaturePyramidNetwork(channels, 8, extra_blocks=LastLevelMaxPool()).to(device, dtype)
    g = torch.Generator().manual_seed(1)
    feats = OrderedDict((f"c{i}", torch.randn((1, c, 8 >> i, 8 >> i), generator=g).to(device, dtype))
                        for i, c in enumerate(channels))
    return tv, feats


def rows_for(device: str, dtype: torch.dtype, stub_launches: bool = False) -> Dict[str, Callable[[], object]]:
    """name -> a zero-argument call, for every layer that can run on ``device``."""
    x, w, b, top = tiny_lateral_case(device, dtype)
    xg = x.clone().requires_grad_()
    w4 = w[:, :, None, None]
    rows: Dict[str, Callable[[], object]] = {
        "eager: conv2d + interpolate + add": lambda: F.conv2d(x, w4, b) + F.interpolate(top, size=(4, 4)),
    }
    backends = fused_fpn.available_backends(device)
    if device == "cpu":
        backends = [n for n in backends if n != "triton"]   # the interpreter: not a launch path
    if "triton" in backends:
        from fused_fpn.backends import triton as tb
        from fused_fpn.kernels import lateral_kernels as K
        from fused_fpn.kernels import lateral_launch as L
        import triton

        out = torch.empty((1, 8, 4, 4), device=device, dtype=dtype)
        args, meta = L.fwd_launch_args(x, w, b, top, out)
        cfg = K.FWD_CONFIGS[(L._arch(x.device), L.config_kind(x))][-1]
        grid = (triton.cdiv(16, cfg.kwargs["BLOCK_M"]) * triton.cdiv(8, cfg.kwargs["BLOCK_N"]),)
        fixed = dict(meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        rows["triton: JIT kernel, fixed config"] = lambda: K._lateral_fwd_kernel[grid](*args, **fixed)
        # as inside the registered op: wrap_triton returns the kernel itself (called outside an op,
        # it would dispatch a higher-order op instead: ~0.9 ms per call on the H200 host, 2026-11-30)
        rows["triton: autotuned kernel"] = lambda: no_hop(lambda: L.gemm_epilogue(x, w, b, top, out))
        rows["triton: autotuned kernel, Autotuner.run"] = lambda: no_hop(
            lambda: without_fast_launch(lambda: L.gemm_epilogue(x, w, b, top, out)))
        op = tb.ops()[0]
        rows["triton: registered op"] = lambda: op(x, w, b, top)
    for name in backends:
        if name == "torch":
            continue
        if name in ("cuda", "cpu"):
            rows[f"{name}: registered op"] = lambda: torch.ops.fused_fpn.lateral(x, w, b, top)
        rows[f"{name}: fused_fpn.lateral"] = lambda n=name: fused_fpn.lateral(x, w, b, top, backend=n)
        rows[f"{name}: fused_fpn.lateral, requires_grad"] = lambda n=name: fused_fpn.lateral(xg, w, b, top, backend=n)
        rows[f"{name}: forward + backward"] = lambda n=name: fused_fpn.lateral(xg, w, b, top, backend=n).sum().backward()
        if name == "triton":
            experimental_variants(rows, "triton: fused_fpn.lateral", "triton: forward + backward")
    rows["eager: forward + backward"] = lambda: (F.conv2d(xg, w4, b) + F.interpolate(top, size=(4, 4))).sum().backward()
    rows.update(fpn_rows(device, dtype, backends))
    if stub_launches:   # main() checked: cpu tensors, the Triton interpreter active
        rows.update(stubbed_launcher_rows(dtype))   # last: it patches the launcher module for good
    return rows


def fpn_rows(device: str, dtype: torch.dtype, backends: List[str]) -> Dict[str, Callable[[], object]]:
    """Whole-FPN rows: torchvision's FeaturePyramidNetwork and fused_fpn.FPN (each backend) on
    tiny maps (channels 8/16/24/32 -> 8, maps 8x8 .. 1x1, LastLevelMaxPool), no grad and forward +
    backward: the per-call host cost of the module around the kernels, for scale with eager."""
    from collections import OrderedDict
    tv, feats = tiny_fpn(device, dtype)
    tv.eval()
    feats_g = OrderedDict((k, v.clone().requires_grad_()) for k, v in feats.items())

    def no_grad(model):
        def call():
            with torch.no_grad():
                return model(feats)
        return call

    def train(model):
        return lambda: sum(o.sum() for o in model(feats_g).values()).backward()

    rows: Dict[str, Callable[[], object]] = {"FPN torchvision: forward": no_grad(tv),
                                             "FPN torchvision: forward + backward": train(tv)}
    for name in backends:
        if name == "torch":
            continue
        ours = fused_fpn.FPN.from_torchvision(copy.deepcopy(tv), backend=name)
        rows[f"FPN {name}: forward"] = no_grad(ours)
        rows[f"FPN {name}: forward + backward"] = train(ours)
        if name == "triton":
            experimental_variants(rows, "FPN triton: forward", "FPN triton: forward + backward")
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default=None, choices=("fp16", "fp32"),
                        help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--stand-in-sm90", action="store_true",
                        help="cpu without TRITON_INTERPRET: only the Triton launchers' rows with triton's JIT "
                             "compiling for sm_90 and a stand-in driver that launches nothing")
    parser.add_argument("--stub-triton-launch", action="store_true",
                        help="cpu with TRITON_INTERPRET=1: add the Triton launchers' rows with the JIT launch "
                             "stubbed out (their own Python cost on this machine)")
    args = parser.parse_args(argv)
    dtype_name = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    if args.stub_triton_launch and (args.device != "cpu" or "triton" not in fused_fpn.available_backends("cpu")):
        print("--stub-triton-launch needs --device cpu and TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if args.stand_in_sm90 and (args.device != "cpu" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
        print("--stand-in-sm90 needs --device cpu without TRITON_INTERPRET", file=sys.stderr)
        return 2
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    problem = "fp16, x [2, 64, 8, 12] channels_last" if args.stand_in_sm90 else f"{dtype_name}, x [1, 8, 4, 4]"
    triton_version = getattr(sys.modules.get("triton"), "__version__", "not imported")   # (fused_fpn imports it)
    print(f"host time per call, {where}, {problem}, {args.calls} calls x 5 (median); torch {torch.__version__}, "
          f"triton {triton_version}, {torch.get_num_threads()} CPU threads")
    results = []
    rows = stand_in_sm90_rows() if args.stand_in_sm90 else rows_for(args.device, dtype, args.stub_triton_launch)
    width = max(map(len, rows))
    for name, fn in rows.items():
        try:
            calls = args.calls if not name.startswith("FPN") else max(20, args.calls // 10)   # ~10x longer calls
            with experimental_switch(name):
                us = time_per_call(fn, args.device, calls)
            results.append({"row": name, "us_per_call": round(us, 2)})
            print(f"  {name:<{width}s} {us:9.1f} us")
        except Exception as exc:  # noqa: BLE001 - a row that cannot run is reported, the rest go on
            results.append({"row": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"  {name:<{width}s}  ERROR {type(exc).__name__}: {exc}"[:200])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "dtype": dtype_name, "calls": args.calls, "rows": results}, f, indent=1)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
