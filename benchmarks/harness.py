"""Shared harness of the fused_fpn benchmark suite (``pytest benchmarks``, run by ``make bench``).

What one benchmark row is: a *workload* (case x dtype x layout on one device: its inputs, rotated
among several sets, and the eager torchvision result) run by one *provider*:

    eager                  torchvision's own code (the reference): ``FeaturePyramidNetwork``, or for
                           the lateral op conv1x1 + F.interpolate(nearest, size) + add
    compile                torch.compile of the same torchvision code (default mode)
    compile-max-autotune   torch.compile(mode="max-autotune-no-cudagraphs") (GPU only; see MAX_AUTOTUNE_ENV):
                           max-autotune's kernels without its CUDA graphs, whose replays copy every
                           input into the graph's buffers (a copy of the inputs per call)
    fused-<backend>        fused_fpn with backend=<backend>, for every backend that runs on the device
                           (``fused_fpn.available_backends(device)``; "triton" is left out on CPU, where
                           it is only the interpreter)
    fused-triton-x         backend="triton" with FUSED_FPN_TRITON_EXPERIMENTAL=1 during its calls (the
                           forward autotunes over the experimental configs too, but for the narrow
                           lists' launches, over the TMA ones on channels_last x, and over the
                           weight-stationary ones on channels_last x of at most 256 channels), and
                           every launch made before runs its kept binary, without JITFunction.run;
                           GPU only, and only when --bench-providers names it exactly (e.g.
                           "eager,fused-triton,fused-triton-x")

The providers of one workload are measured together (``BenchRun``): parity first (each provider's
output against eager, per-dtype tolerances; a provider that differs is FAILED-PARITY and is neither
timed nor reported as a speedup), then warm-up, then timed calls interleaved across the providers
(so a drifting machine hits them alike) with the inputs rotated among enough sets to overflow the
last-level cache: CUDA events around each call on GPU, ``time.perf_counter`` on CPU; the median and
quartiles are reported, never a mean. Peak memory is measured in one more call (``MEMORY_MEASURE``).

For the lateral op the bytes it must move (DESIGN.md section 5) give the achieved GB/s and the % of a
copy-bandwidth ceiling measured in the same run (``measure_copy_ceiling``).

This module has no pytest dependency: benchmarks/conftest.py drives it, tests/test_bench_harness.py
unit-tests it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import fnmatch
import json
import math
import os
import platform
import random
import re
import statistics
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fused_fpn._precision import conv_allows_tf32

SCHEMA = "fused_fpn-bench/1"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
LAYOUTS = ("nchw", "channels_last")

# Env switches (each also has a pytest option in benchmarks/conftest.py where noted there).
QUICK_ENV = "FUSED_FPN_BENCH_QUICK"                # 1: tiny shapes, 3 timed calls (smoke runs)
DEVICE_ENV = "FUSED_FPN_BENCH_DEVICE"              # cpu | cuda (default: cuda when available)
RESULTS_ENV = "FUSED_FPN_BENCH_RESULTS_DIR"        # where JSON/PNG/MD go (default benchmarks/results)
PROVIDERS_ENV = "FUSED_FPN_BENCH_PROVIDERS"        # comma list of fnmatch patterns, e.g. "eager,fused-*"
CASES_ENV = "FUSED_FPN_BENCH_CASES"                # comma list of fnmatch patterns over case names
DTYPES_ENV = "FUSED_FPN_BENCH_DTYPES"              # comma list: fp16,bf16,fp32
LAYOUTS_ENV = "FUSED_FPN_BENCH_LAYOUTS"            # comma list: nchw,channels_last
BUDGET_ENV = "FUSED_FPN_BENCH_BUDGET_S"            # seconds; rows not started by then are NOT-RUN
MAX_AUTOTUNE_ENV = "FUSED_FPN_BENCH_MAX_AUTOTUNE"  # GPU: "path" (default: lateral_path fp16 only),
#                                                    "lateral" (every lateral case), "0" (never)

MEMORY_MEASURE = {
    "cuda": "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() "
            "before the call (inputs and weights excluded, output included)",
    "cpu": "peak of the c10 CPU allocator's bytes in use during one call, from torch.profiler "
           "(profile_memory=True) allocation events, over the bytes in use before the call "
           "(inputs and weights excluded, output included; allocations made outside c10, e.g. "
           "oneDNN scratch space, are not seen)",
}


# --------------------------------------------------------------------------------------------
# Shapes and configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shapes:
    """ResNet-FPN feature pyramid: level i has in_channels[i] channels at stride strides[i]."""
    batch: int
    image_hw: Tuple[int, int]
    in_channels: Tuple[int, ...] = (256, 512, 1024, 2048)
    out_channels: int = 256
    strides: Tuple[int, ...] = (4, 8, 16, 32)

    def level_hw(self, i: int) -> Tuple[int, int]:
        s = self.strides[i]
        return (self.image_hw[0] // s, self.image_hw[1] // s)

    @property
    def levels(self) -> int:
        return len(self.in_channels)

    def describe(self) -> str:
        maps = ", ".join(f"{c}x{h}x{w}" for c, (h, w) in
                         zip(self.in_channels, (self.level_hw(i) for i in range(self.levels))))
        return (f"batch {self.batch}, image {self.image_hw[0]}x{self.image_hw[1]}, "
                f"C2..C5 [{maps}] -> {self.out_channels}")


@dataclass(frozen=True)
class DetectorShapes:
    """Images given to fasterrcnn_resnet50_fpn; min_size/max_size of its transform (no resizing when
    the image already fits them)."""
    images: int
    image_hw: Tuple[int, int]
    min_size: int
    max_size: int


CPU_SHAPES = Shapes(batch=1, image_hw=(512, 512))
GPU_SHAPES = Shapes(batch=2, image_hw=(800, 1216))
QUICK_SHAPES = Shapes(batch=1, image_hw=(64, 64), in_channels=(16, 32, 64, 128), out_channels=32)
CPU_DETECTOR = DetectorShapes(images=1, image_hw=(512, 512), min_size=512, max_size=512)
GPU_DETECTOR = DetectorShapes(images=2, image_hw=(800, 1216), min_size=800, max_size=1333)
QUICK_DETECTOR = DetectorShapes(images=1, image_hw=(128, 128), min_size=128, max_size=128)

LEVEL_CASES = ("lateral_P2", "lateral_P3", "lateral_P4", "lateral_P5")
CASES = ("lateral_path", "lateral_train", "fpn_forward", "fpn_train") + LEVEL_CASES + ("detector",)
CASE_DOC = {
    "lateral_P2": "fused op, one level (P2: finest; top = P3's inner map)",
    "lateral_P3": "fused op, one level (P3)",
    "lateral_P4": "fused op, one level (P4)",
    "lateral_P5": "fused op, one level (P5: coarsest, no top: a plain 1x1 conv)",
    "lateral_path": "the whole lateral path: 4 levels, top-down (P5 conv, then P4..P2 fused)",
    "lateral_train": "the lateral path forward + backward (grads of the 4 inputs and the 1x1 weights and biases)",
    "fpn_forward": "whole FPN forward (lateral path + 3x3 output convs + LastLevelMaxPool), no grad",
    "fpn_train": "FPN training step: forward + backward (grads of the inputs and every parameter)",
    "detector": "fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval(), end to end",
}


def parse_levels(text: str) -> List[int]:
    """"P2,P5" -> [0, 3]: level names (comma list, any case) to indices into GPU_SHAPES' levels, for
    the GPU diagnostics' --levels; raises argparse.ArgumentTypeError for a level that does not exist."""
    names = [t.strip().upper() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in ("P2", "P3", "P4", "P5")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"levels are P2, P3, P4, P5 (comma list), got {text!r}")
    return sorted({int(t[1]) - 2 for t in names})


@dataclass
class TimingConfig:
    warmup: int
    min_reps: int
    max_reps: int
    target_s: float          # aim for this much timed work per row (reps = target / one call)
    set_bytes_cap: int       # total bytes of rotated input sets per workload
    max_sets: int


CPU_TIMING = TimingConfig(warmup=2, min_reps=5, max_reps=30, target_s=1.5, set_bytes_cap=1 << 30, max_sets=8)
GPU_TIMING = TimingConfig(warmup=5, min_reps=25, max_reps=200, target_s=0.25, set_bytes_cap=4 << 30, max_sets=32)
QUICK_TIMING = TimingConfig(warmup=1, min_reps=3, max_reps=3, target_s=0.0, set_bytes_cap=64 << 20, max_sets=2)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_list(name: str) -> Optional[List[str]]:
    raw = os.environ.get(name, "").strip()
    return [p.strip() for p in raw.split(",") if p.strip()] if raw else None


@dataclass
class BenchConfig:
    device: str
    quick: bool = False
    results_dir: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    providers: Optional[List[str]] = None   # fnmatch patterns; None = all
    cases: Optional[List[str]] = None       # fnmatch patterns; None = the device's default plan
    dtypes: Optional[List[str]] = None      # None = the device's default plan
    layouts: Optional[List[str]] = None
    budget_s: Optional[float] = None
    max_autotune: str = "path"
    command: str = ""

    @classmethod
    def from_env(cls, **overrides) -> "BenchConfig":
        """Build from the FUSED_FPN_BENCH_* environment; keyword overrides (not None) win."""
        device = os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
        budget = os.environ.get(BUDGET_ENV)
        try:
            budget = float(budget) if budget else None
        except ValueError:
            raise ValueError(f"{BUDGET_ENV} must be a number of seconds, got {budget!r}") from None
        cfg = cls(device=device, quick=_env_flag(QUICK_ENV),
                  providers=_env_list(PROVIDERS_ENV), cases=_env_list(CASES_ENV),
                  dtypes=_env_list(DTYPES_ENV), layouts=_env_list(LAYOUTS_ENV),
                  budget_s=budget,
                  max_autotune=os.environ.get(MAX_AUTOTUNE_ENV, "path").strip().lower() or "path")
        if os.environ.get(RESULTS_ENV):
            cfg.results_dir = os.environ[RESULTS_ENV]
        for key, value in overrides.items():
            if value is not None:
                setattr(cfg, key, value)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"benchmark device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("benchmark device 'cuda' was asked for but torch.cuda.is_available() is False")
        for d in self.dtypes or []:
            if d not in DTYPES:
                raise ValueError(f"benchmark dtypes must be among {list(DTYPES)}, got {d!r}")
        for lay in self.layouts or []:
            if lay not in LAYOUTS:
                raise ValueError(f"benchmark layouts must be among {list(LAYOUTS)}, got {lay!r}")
        if self.max_autotune not in ("0", "path", "lateral"):
            raise ValueError(f"{MAX_AUTOTUNE_ENV} must be 0, path or lateral, got {self.max_autotune!r}")
        if self.budget_s is not None and self.budget_s <= 0:
            raise ValueError(f"{BUDGET_ENV} must be > 0 seconds, got {self.budget_s}")

    @property
    def shapes(self) -> Shapes:
        return QUICK_SHAPES if self.quick else (GPU_SHAPES if self.device == "cuda" else CPU_SHAPES)

    @property
    def detector(self) -> DetectorShapes:
        return QUICK_DETECTOR if self.quick else (GPU_DETECTOR if self.device == "cuda" else CPU_DETECTOR)

    @property
    def timing(self) -> TimingConfig:
        return QUICK_TIMING if self.quick else (GPU_TIMING if self.device == "cuda" else CPU_TIMING)


# --------------------------------------------------------------------------------------------
# The plan: which (case, dtype, layout, provider) rows run
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowSpec:
    case: str
    dtype: str
    layout: str
    provider: str
    priority: Tuple[int, ...] = ()

    @property
    def key(self) -> Tuple[str, str, str]:
        return (self.case, self.dtype, self.layout)

    @property
    def id(self) -> str:
        return f"{self.case}-{self.dtype}-{self.layout}-{self.provider}"


# Default GPU plan, in priority order (rows left when the time budget runs out are the last ones):
# every case in fp16 (both layouts); the lateral path and the FPN forward in bf16 and fp32 too.
_GPU_PLAN = [
    (("fp16", "nchw"), CASES),
    (("fp16", "channels_last"), CASES),
    (("bf16", "nchw"), ("lateral_path", "fpn_forward")),
    (("fp32", "nchw"), ("lateral_path", "fpn_forward")),
    (("bf16", "channels_last"), ("lateral_path", "fpn_forward")),
    (("fp32", "channels_last"), ("lateral_path", "fpn_forward")),
]
# Default CPU plan: every case in fp32 NCHW; the lateral path, each level and the FPN forward in fp32
# channels_last too (the fused CPU epilogue has a separate route per layout).
_CPU_PLAN = [
    (("fp32", "nchw"), CASES),
    (("fp32", "channels_last"), ("lateral_path", "fpn_forward") + LEVEL_CASES),
]


def fused_backends(device: str) -> List[str]:
    """fused_fpn backends to benchmark on ``device`` (triton is left out on CPU: interpreter only)."""
    import fused_fpn
    names = list(fused_fpn.available_backends(device))
    if device == "cpu":
        names = [n for n in names if n != "triton"]
    return names


def backend_supports(name: str, device: str, dtype: torch.dtype) -> Optional[str]:
    """None when fused_fpn backend ``name`` runs on ``device`` tensors of ``dtype``, else why not."""
    from fused_fpn import backends as fb
    probe = torch.empty((1, 1, 1, 1), device=device, dtype=dtype)
    return fb.why_not(name, probe)


EXPERIMENTAL_PROVIDER = "fused-triton-x"


def wants_experimental(patterns: Optional[Sequence[str]]) -> bool:
    """True when --bench-providers names the experimental provider itself (it is never a default, and a
    wildcard such as "fused-*" does not bring it in)."""
    return bool(patterns) and EXPERIMENTAL_PROVIDER in patterns


def with_experimental_configs(fn: Callable) -> Callable:
    """fn with FUSED_FPN_TRITON_EXPERIMENTAL=1 set during each call (the Triton launcher reads it at
    each launch), and the previous value restored after it."""
    from fused_fpn.kernels import lateral_kernels as K

    def call(*args):
        old = os.environ.get(K.EXPERIMENTAL_ENV)
        os.environ[K.EXPERIMENTAL_ENV] = "1"
        try:
            return fn(*args)
        finally:
            if old is None:
                del os.environ[K.EXPERIMENTAL_ENV]
            else:
                os.environ[K.EXPERIMENTAL_ENV] = old
    return call


def providers_for(cfg: BenchConfig, case: str, dtype: str, layout: str) -> List[str]:
    names = ["eager", "compile"]
    if cfg.device == "cuda" and case not in ("detector", "fpn_train", "lateral_train"):
        lateral_case = case == "lateral_path" or case in LEVEL_CASES
        if (cfg.max_autotune == "path" and case == "lateral_path" and dtype == "fp16" and layout == "nchw") or \
                (cfg.max_autotune == "lateral" and lateral_case):
            names.append("compile-max-autotune")
    for b in fused_backends(cfg.device):
        if backend_supports(b, cfg.device, DTYPES[dtype]) is None:
            names.append(f"fused-{b}")
    if cfg.device == "cuda" and "fused-triton" in names and wants_experimental(cfg.providers):
        names.append(EXPERIMENTAL_PROVIDER)
    if cfg.providers:
        keep = [n for n in names if any(fnmatch.fnmatch(n, p) for p in cfg.providers)]
        if keep and "eager" not in keep:
            keep.insert(0, "eager")   # the reference always runs: parity and speedups need it
        names = keep
    return names


def plan(cfg: BenchConfig, cases: Sequence[str] = CASES) -> List[RowSpec]:
    """The rows to run for ``cases`` (in priority order), after the config's filters."""
    base = _GPU_PLAN if cfg.device == "cuda" else _CPU_PLAN
    if cfg.dtypes or cfg.layouts:  # an explicit matrix: every case in every asked dtype x layout
        dts = cfg.dtypes or sorted({d for (d, _), _ in base}, key=list(DTYPES).index)
        lays = cfg.layouts or sorted({lay for (_, lay), _ in base}, key=LAYOUTS.index)
        base = [((d, lay), CASES) for d in dts for lay in lays]
    rows = []
    for gi, ((dtype, layout), group_cases) in enumerate(base):
        for case in group_cases:
            if case not in cases:
                continue
            if cfg.cases and not any(fnmatch.fnmatch(case, p) for p in cfg.cases):
                continue
            if case == "detector" and dtype != "fp32" and cfg.device == "cpu":
                continue
            for pi, prov in enumerate(providers_for(cfg, case, dtype, layout)):
                rows.append(RowSpec(case, dtype, layout, prov, (gi, CASES.index(case), pi)))
    return rows


# --------------------------------------------------------------------------------------------
# Byte counts and roofline (DESIGN.md section 5)
# --------------------------------------------------------------------------------------------

def lateral_bytes(n: int, cin: int, h: int, w: int, cout: int, top_hw: Optional[Tuple[int, int]],
                  elem_bytes: int, bias: bool = True) -> Dict[str, int]:
    """Bytes moved by one lateral level y = conv1x1(x) + b + nearest(top, size=(h, w)).

    fused: read x, W, bias and top once each, write y once.
    eager: conv (read x, W, bias; write the lateral map) + interpolate (read top; write the
           upsampled map) + add (read both; write y). Without a top the level is the conv alone.
    """
    x = n * cin * h * w
    wgt = cout * cin
    b = cout if bias else 0
    y = n * cout * h * w
    top = n * cout * top_hw[0] * top_hw[1] if top_hw is not None else 0
    fused = x + wgt + b + top + y
    if top_hw is None:
        eager = x + wgt + b + y
    else:
        eager = (x + wgt + b + y) + (top + y) + (2 * y + y)
    return {"fused": fused * elem_bytes, "eager": eager * elem_bytes}


def lateral_path_bytes(shapes: Shapes, elem_bytes: int) -> Dict[str, int]:
    """Sum over the levels of ``lateral_bytes``: level i's top is level i+1's output; the coarsest has none."""
    total = {"fused": 0, "eager": 0}
    for i in range(shapes.levels):
        h, w = shapes.level_hw(i)
        top = shapes.level_hw(i + 1) if i + 1 < shapes.levels else None
        b = lateral_bytes(shapes.batch, shapes.in_channels[i], h, w, shapes.out_channels, top, elem_bytes)
        total["fused"] += b["fused"]
        total["eager"] += b["eager"]
    return total


def lateral_flops(n: int, cin: int, h: int, w: int, cout: int) -> int:
    """Floating-point operations of one lateral level's 1x1 conv: 2 * N*H*W * Cin * Cout (a multiply
    and an add per term; the bias and top adds are N*H*W*Cout each, left out as DESIGN.md does)."""
    return 2 * n * h * w * cin * cout


def lateral_path_flops(shapes: Shapes) -> int:
    """Sum over the levels of ``lateral_flops``."""
    return sum(lateral_flops(shapes.batch, shapes.in_channels[i], *shapes.level_hw(i), shapes.out_channels)
               for i in range(shapes.levels))


def roofline(nbytes: int, seconds: float, ceiling_bytes_per_s: float) -> Tuple[float, float]:
    """(achieved GB/s, % of the ceiling) for ``nbytes`` moved in ``seconds``."""
    if seconds <= 0 or ceiling_bytes_per_s <= 0:
        raise ValueError(f"seconds and ceiling must be > 0, got {seconds} and {ceiling_bytes_per_s}")
    achieved = nbytes / seconds
    return achieved / 1e9, 100.0 * achieved / ceiling_bytes_per_s


def copy_bandwidth(nbytes: int, seconds: float) -> float:
    """Bytes/s of a copy of ``nbytes``: a copy reads and writes every byte, so 2 * nbytes moved."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    return 2.0 * nbytes / seconds


# --------------------------------------------------------------------------------------------
# Parity gate
# --------------------------------------------------------------------------------------------

# dtype -> (atol, rtol) for a provider's output against eager's, both at that dtype. atol is in units of
# the reference's RMS (features of a random-weight detector are ~100, unit-variance inputs ~1), so one
# table serves every case. fp32 on CUDA follows cudnn.allow_tf32 (eager's conv uses TF32 when it is on).
PARITY_TOL = {
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (8e-2, 4e-2),
}
PARITY_TOL_TF32 = (1e-2, 1e-2)


def parity_tolerance(dtype: torch.dtype, device: str) -> Tuple[float, float]:
    if dtype == torch.float32 and device == "cuda" and conv_allows_tf32():
        return PARITY_TOL_TF32
    return PARITY_TOL[dtype]


@dataclass
class Parity:
    ok: bool
    max_abs_err: float
    worst: float          # max over elements of |out - ref| / (atol * scale + rtol * |ref|); ok iff <= 1
    rel_l2: float
    atol: float
    rtol: float
    message: str = ""


def check_parity(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], dtype: torch.dtype,
                 device: str) -> Parity:
    """Compare a provider's outputs with eager's, tensor by tensor (shape, dtype, finiteness, values)."""
    atol, rtol = parity_tolerance(dtype, device)
    if len(outs) != len(refs):
        return Parity(False, math.inf, math.inf, math.inf, atol, rtol,
                      f"{len(outs)} output tensors, eager gives {len(refs)}")
    max_abs, worst, num, den = 0.0, 0.0, 0.0, 0.0
    for i, (o, r) in enumerate(zip(outs, refs)):
        if tuple(o.shape) != tuple(r.shape):
            return Parity(False, math.inf, math.inf, math.inf, atol, rtol,
                          f"output {i}: shape {tuple(o.shape)}, eager {tuple(r.shape)}")
        if o.dtype != r.dtype:
            return Parity(False, math.inf, math.inf, math.inf, atol, rtol,
                          f"output {i}: dtype {o.dtype}, eager {r.dtype}")
        if o.numel() == 0:
            continue
        o64, r64 = o.detach().double(), r.detach().double()
        if not torch.isfinite(r64).all():
            return Parity(False, math.inf, math.inf, math.inf, atol, rtol,
                          f"output {i}: eager's own output is not finite; nothing to compare against")
        if not torch.isfinite(o64).all():
            return Parity(False, math.inf, math.inf, math.inf, atol, rtol, f"output {i}: has NaN or inf")
        diff = (o64 - r64).abs()
        scale = max(1.0, r64.pow(2).mean().sqrt().item())
        ratio = diff / (atol * scale + rtol * r64.abs())
        max_abs = max(max_abs, diff.max().item())
        worst = max(worst, ratio.max().item())
        num += diff.pow(2).sum().item()
        den += r64.pow(2).sum().item()
    rel = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    ok = worst <= 1.0
    msg = "" if ok else (f"max |out - eager| = {max_abs:.4g} exceeds atol {atol:g} x RMS + rtol {rtol:g} x |eager| "
                         f"(worst element at {worst:.3g}x the tolerance; relative L2 error {rel:.3g})")
    return Parity(ok, max_abs, worst, rel, atol, rtol, msg)


# --------------------------------------------------------------------------------------------
# Timing, memory, ceiling
# --------------------------------------------------------------------------------------------

@dataclass
class Timing:
    median_s: float
    p25_s: float
    p75_s: float
    min_s: float
    max_s: float
    n: int
    method: str


def summarize(samples: Sequence[float], method: str) -> Timing:
    if not samples:
        raise ValueError("no timing samples")
    s = sorted(samples)
    if len(s) >= 2:
        q = statistics.quantiles(s, n=4, method="inclusive")
        p25, p75 = q[0], q[2]
    else:
        p25 = p75 = s[0]
    return Timing(statistics.median(s), p25, p75, s[0], s[-1], len(s), method)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def round_orders(names: Sequence[str], reps: int, seed: int = 0) -> List[List[str]]:
    """The providers' call order in each of ``reps`` rounds: a fresh shuffle per round (seeded, so a
    run is repeatable). A fixed cyclic order would put the same provider before each one in most rounds,
    and what a call leaves behind (a busy GPU, the cache's contents) would then bias its successor."""
    rng = random.Random(seed)
    orders = []
    for _ in range(reps):
        order = list(names)
        rng.shuffle(order)
        orders.append(order)
    return orders


def _reps_for(one_call_s: float, t: TimingConfig) -> int:
    if t.target_s <= 0 or one_call_s <= 0:
        return t.min_reps
    return int(min(t.max_reps, max(t.min_reps, math.ceil(t.target_s / one_call_s))))


def time_interleaved(fns: Dict[str, Callable], input_sets: Sequence[tuple], device: str,
                     t: TimingConfig, graphs: Optional[bool] = None) -> Dict[str, Timing]:
    """Time several providers of one workload, interleaved call by call.

    Each provider is warmed up, then every round calls each provider once (in a shuffled order each
    round: ``round_orders``), so a slow drift of the machine (other processes on a shared CPU, GPU
    clocks) hits every provider alike instead of whichever ran last. Inputs rotate among the k sets by a
    global call counter, so no call reads the inputs the previous call just pulled into the cache.
    GPU: a synchronize, then a pair of CUDA events around the call (its time from an idle GPU, the
    host's launch overhead included: without the synchronize a call issued while the previous one's
    kernels still run would hide its own launch); CPU: perf_counter.
    The number of rounds is set from one timed call per provider (the median of them) and ``t``.
    ``graphs``: time CUDA-graph replays (default: ``cuda_graph_timing()``, the environment's choice).
    """
    names = list(fns)
    if not names:
        return {}
    k = len(input_sets)
    est = []
    for name in names:  # warm-up; the last warm-up call (synchronized) estimates one call's time
        for i in range(max(1, t.warmup)):
            _sync(device)
            t0 = time.perf_counter()
            fns[name](*input_sets[i % k])
            _sync(device)
        est.append(time.perf_counter() - t0)
    reps = _reps_for(statistics.median(est), t)
    calls = 0
    if device == "cuda" and (cuda_graph_timing() if graphs is None else graphs):
        return _time_graph_replays(fns, input_sets, reps)
    if device == "cuda":
        events = {n: [] for n in names}
        pool = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(reps * len(names))]
        for order in round_orders(names, reps):
            for name in order:
                args = input_sets[calls % k]
                start, end = pool[calls]
                calls += 1
                torch.cuda.synchronize()
                start.record()
                fns[name](*args)
                end.record()
                events[name].append((start, end))
        torch.cuda.synchronize()
        samples = {n: [s.elapsed_time(e) * 1e-3 for s, e in events[n]] for n in names}
        method = "CUDA events per call from an idle GPU"
    else:
        samples = {n: [] for n in names}
        for order in round_orders(names, reps):
            for name in order:
                args = input_sets[calls % k]
                calls += 1
                t0 = time.perf_counter()
                fns[name](*args)
                samples[name].append(time.perf_counter() - t0)
        method = "time.perf_counter per call"
    how = f"{method}, providers interleaved (shuffled), inputs rotated" if len(names) > 1 else f"{method}, inputs rotated"
    return {n: summarize(samples[n], how) for n in names}


def cuda_graph_timing() -> bool:
    """FUSED_FPN_BENCH_CUDA_GRAPHS=1: time CUDA-graph replays of each call (kernel time without the
    host's launch overhead) instead of eager calls."""
    return os.environ.get("FUSED_FPN_BENCH_CUDA_GRAPHS", "0").strip().lower() in ("1", "true", "yes", "on")


GRAPH_REPLAY_METHOD = "CUDA-graph replay per call"   # how a graph-replay row's timing_method begins


def _time_graph_replays(fns: Dict[str, Callable], input_sets: Sequence[tuple], reps: int) -> Dict[str, Timing]:
    """Capture one call per (provider, input set) in a CUDA graph (after the warm-up done by the caller),
    then time replays with a pair of CUDA events each, providers interleaved, inputs rotated. A provider
    that cannot be captured (e.g. torch.compile's own cudagraphs) falls back to timed eager calls."""
    names = list(fns)
    k = len(input_sets)
    graphs: Dict[str, list] = {}
    for name in names:
        try:
            per_set = []
            for args in input_sets:
                g = torch.cuda.CUDAGraph()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    fns[name](*args)            # warm the side stream (allocator pools)
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(g):
                    out = fns[name](*args)
                per_set.append((g, out))
            graphs[name] = per_set
        except Exception:  # noqa: BLE001 - not capturable: time it eagerly below
            torch.cuda.synchronize()
            graphs.pop(name, None)
    events = {n: [] for n in names}
    calls = 0
    for order in round_orders(names, reps):
        for name in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            idx = calls % k
            calls += 1
            if name not in graphs:   # timed as in time_interleaved: from an idle GPU
                torch.cuda.synchronize()
            start.record()
            if name in graphs:
                graphs[name][idx][0].replay()
            else:
                fns[name](*input_sets[idx])
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    out = {}
    for n in names:
        how = (GRAPH_REPLAY_METHOD + ", CUDA events" if n in graphs
               else "CUDA events per eager call from an idle GPU (graph capture failed)") + \
            ", providers interleaved (shuffled), inputs rotated"
        out[n] = summarize([s.elapsed_time(e) * 1e-3 for s, e in events[n]], how)
    return out


def time_provider(fn: Callable, input_sets: Sequence[tuple], device: str, t: TimingConfig,
                  graphs: Optional[bool] = None) -> Timing:
    """Warm up, then time ``fn(*input_sets[i % k])`` call by call; inputs rotate among the k sets."""
    return time_interleaved({"fn": fn}, input_sets, device, t, graphs)["fn"]


def peak_memory(fn: Callable, args: tuple, device: str) -> int:
    """Peak bytes allocated during one call of fn(*args) above what was allocated before it
    (see MEMORY_MEASURE for what each device's number is)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn(*args)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*args)
    del out
    return cpu_peak_from_events(_cpu_memory_events(prof))


def _cpu_memory_events(prof) -> List[Tuple[int, int]]:
    events = []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"):
            events.append((e.start_ns(), e.nbytes()))
    return events


def cpu_peak_from_events(events: Sequence[Tuple[int, int]]) -> int:
    """Peak of the running sum of (time, +alloc / -free bytes) events, in time order (0 if none)."""
    running, peak = 0, 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        running += nbytes
        peak = max(peak, running)
    return int(peak)


@dataclass
class Ceiling:
    bytes_per_s: float
    copy_bytes: int
    method: str


def measure_copy_ceiling(device: str, quick: bool = False) -> Ceiling:
    """Copy bandwidth of this device, measured now: median over timed copies of a large buffer
    (device-to-device on GPU; a multi-threaded tensor copy in host memory on CPU), 2 bytes moved per
    byte copied."""
    if device == "cuda":
        nbytes = (256 << 20) if quick else (1 << 30)
        reps, warm = (5, 2) if quick else (20, 3)
    else:
        nbytes = (32 << 20) if quick else (256 << 20)
        reps, warm = (3, 1) if quick else (10, 2)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    cfg = TimingConfig(warmup=warm, min_reps=reps, max_reps=reps, target_s=0.0, set_bytes_cap=0, max_sets=1)
    # timed as eager calls in every timing mode. Captured in a CUDA graph, a copy_ becomes a memcpy
    # node (the copy engine's, we infer): graph-mode runs measured 2707 GB/s against 4241 in an
    # eager-mode run minutes before on the same H200 (2026-11-30; H100, 2026-11-24: 2429 vs 3010),
    # which inflated every % of the ceiling in graph mode (by 1.24x and 1.57x)
    timing = time_provider(lambda: dst.copy_(src), [()], device, cfg, graphs=False)
    bw = copy_bandwidth(src.numel() * 4, timing.median_s)
    n = torch.get_num_threads()
    how = "device-to-device copy_" if device == "cuda" else f"tensor copy_ on {n} thread{'s' if n != 1 else ''}"
    return Ceiling(bw, src.numel() * 4, f"{how} of {nbytes >> 20} MiB, median of {reps}, read+write counted")


def cache_bytes(device: str) -> int:
    """Size of the last-level cache the input rotation must overflow."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 0) or (50 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            path = os.path.join(base, entry, "size")
            if os.path.exists(path):
                with open(path) as f:
                    text = f.read().strip().upper()
                m = re.match(r"(\d+)([KMG]?)", text)
                if m:
                    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
                    best = max(best, int(m.group(1)) * mult)
    except OSError:
        pass
    return best or (32 << 20)


def num_input_sets(set_bytes: int, cache: int, cap_bytes: int, max_sets: int) -> int:
    """Enough input sets that one rotation moves at least 2x the cache, within the memory cap."""
    if set_bytes <= 0:
        return 1
    want = max(2, math.ceil(2 * cache / set_bytes))
    fit = max(1, cap_bytes // set_bytes)
    return int(max(1, min(want, fit, max_sets)))


def rotated_input_sets(make_one: Callable[[], tuple], device: str, t: TimingConfig) -> Tuple[List[tuple], int]:
    """(sets, bytes of one set): ``make_one()`` called ``num_input_sets`` times, so that timed calls
    rotating through the sets never find their inputs in the last-level cache."""
    first = make_one()
    set_bytes = sum(x.numel() * x.element_size() for x in _flat_tensors(first))
    n = num_input_sets(set_bytes, cache_bytes(device), t.set_bytes_cap, t.max_sets)
    return [first] + [make_one() for _ in range(n - 1)], set_bytes


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------

def _fmt(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def eager_lateral(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  top: Optional[torch.Tensor]) -> torch.Tensor:
    """torchvision's eager lateral step: conv1x1 + F.interpolate(top, size, nearest) + add."""
    y = F.conv2d(x, weight, bias)
    if top is None:
        return y
    return y + F.interpolate(top, size=x.shape[-2:], mode="nearest")


class EagerLateral(nn.Module):
    """One lateral level, torchvision's way (the module torch.compile compiles)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x, top=None):
        return eager_lateral(x, self.weight, self.bias, top)


class EagerLateralPath(nn.Module):
    """The whole lateral path, torchvision's way: P5 = conv(C5); Pi = conv(Ci) + nearest(P(i+1))."""

    def __init__(self, params: Sequence[Tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.levels = nn.ModuleList([EagerLateral(w, b) for w, b in params])

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        last = self.levels[-1](feats[-1])
        outs = [last]
        for i in range(len(feats) - 2, -1, -1):
            last = self.levels[i](feats[i], last)
            outs.insert(0, last)
        return outs


class FusedLateralPath(nn.Module):
    """The same path through ``fused_fpn.lateral(..., backend=backend)``."""

    def __init__(self, eager: EagerLateralPath, backend: str):
        super().__init__()
        self.eager = eager
        self.backend = backend

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        import fused_fpn
        lv = self.eager.levels
        last = fused_fpn.lateral(feats[-1], lv[-1].weight, lv[-1].bias, None, backend=self.backend)
        outs = [last]
        for i in range(len(feats) - 2, -1, -1):
            last = fused_fpn.lateral(feats[i], lv[i].weight, lv[i].bias, last, backend=self.backend)
            outs.insert(0, last)
        return outs


def _compile(obj, provider: str):
    mode = "max-autotune-no-cudagraphs" if provider == "compile-max-autotune" else None
    return torch.compile(obj, mode=mode, dynamic=False)


def _as_list(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return list(out.values())
    return list(out)


class Workload:
    """Inputs (rotated sets), eager reference output and provider callables for one row key."""

    needs_grad = False
    lateral_bytes: Optional[Dict[str, int]] = None
    lateral_flops: Optional[int] = None   # the 1x1 convs' FLOPs, where lateral_bytes is set

    def __init__(self, case: str, dtype: str, layout: str, cfg: BenchConfig, seed: int = 0):
        self.case, self.dtype_name, self.layout, self.cfg = case, dtype, layout, cfg
        self.dtype = DTYPES[dtype]
        self.device = cfg.device
        self.shapes = cfg.shapes
        self.gen = torch.Generator(device=self.device).manual_seed(seed)  # inputs are made on the device
        self.elem_bytes = torch.empty((), dtype=self.dtype).element_size()
        self.input_sets: List[tuple] = []
        self.set_bytes = 0

    # helpers
    def randn(self, *shape, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen, device=self.device) * scale
        return t.to(dtype=self.dtype)

    def make_sets(self, make_one: Callable[[], tuple]) -> None:
        self.input_sets, self.set_bytes = rotated_input_sets(make_one, self.device, self.cfg.timing)

    def provider_fn(self, provider: str) -> Callable:
        raise NotImplementedError

    def outputs(self, out) -> List[torch.Tensor]:
        return _as_list(out)

    def bytes_for(self, provider: str) -> Optional[int]:
        """Bytes this provider's own algorithm moves (None where unknown, e.g. torch.compile)."""
        if self.lateral_bytes is None:
            return None
        if provider in ("eager", "fused-torch"):
            return self.lateral_bytes["eager"]
        if provider.startswith("fused-"):
            return self.lateral_bytes["fused"]
        return None

    def describe(self) -> str:
        return CASE_DOC[self.case]


def _flat_tensors(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flat_tensors(o)]
    return []


def _train_step(module: Callable, params: List[torch.Tensor], grad_outputs: List[torch.Tensor]) -> Callable:
    """A training step of ``module`` on feats (a list or dict of tensors): its outputs, then the
    gradients of every input tensor and of ``params`` for the fixed ``grad_outputs``."""
    def train_step(feats):
        outs = _as_list(module(feats))
        grads = torch.autograd.grad(outs, _flat_tensors(feats) + params, grad_outputs)
        return outs + list(grads)
    return train_step


def _fused_name(provider: str) -> str:
    if not provider.startswith("fused-"):
        raise ValueError(f"not a fused_fpn provider: {provider!r}")
    return provider[len("fused-"):]


class LateralLevelWorkload(Workload):
    def __init__(self, case, dtype, layout, cfg, seed=0):
        super().__init__(case, dtype, layout, cfg, seed)
        s = self.shapes
        self.level = LEVEL_CASES.index(case)
        i = self.level
        cin, cout = s.in_channels[i], s.out_channels
        h, w = s.level_hw(i)
        top_hw = s.level_hw(i + 1) if i + 1 < s.levels else None
        weight = self.randn(cout, cin, 1, 1, scale=cin ** -0.5)
        bias = self.randn(cout, scale=0.1)
        self.module = EagerLateral(_fmt(weight, layout), bias)

        def one():
            x = _fmt(self.randn(s.batch, cin, h, w), layout)
            top = _fmt(self.randn(s.batch, cout, *top_hw), layout) if top_hw else None
            return (x, top)
        self.make_sets(one)
        self.lateral_bytes = lateral_bytes(s.batch, cin, h, w, cout, top_hw, self.elem_bytes)
        self.lateral_flops = lateral_flops(s.batch, cin, h, w, cout)
        self.shape_desc = f"x {s.batch}x{cin}x{h}x{w}" + (
            f", top {s.batch}x{cout}x{top_hw[0]}x{top_hw[1]}" if top_hw else "")

    def provider_fn(self, provider):
        if provider == "eager":
            return self.module
        if provider.startswith("compile"):
            return _compile(self.module, provider)
        import fused_fpn
        name, m = _fused_name(provider), self.module
        return lambda x, top: fused_fpn.lateral(x, m.weight, m.bias, top, backend=name)


class LateralPathWorkload(Workload):
    """lateral_path (forward, no grad) and lateral_train (forward + backward: the grads of the 4
    inputs and of the 1x1 weights and biases, for fixed output gradients)."""

    def __init__(self, case, dtype, layout, cfg, seed=0):
        super().__init__(case, dtype, layout, cfg, seed)
        s = self.shapes
        self.needs_grad = case == "lateral_train"
        params = [(_fmt(self.randn(s.out_channels, c, 1, 1, scale=c ** -0.5), layout),
                   self.randn(s.out_channels, scale=0.1)) for c in s.in_channels]
        self.module = EagerLateralPath(params)
        self.module.requires_grad_(self.needs_grad)
        self.make_sets(lambda: ([_fmt(self.randn(s.batch, c, *s.level_hw(i)), layout).requires_grad_(self.needs_grad)
                                 for i, c in enumerate(s.in_channels)],))
        if self.needs_grad:   # fixed output gradients, one per level
            self.grad_outputs = [_fmt(self.randn(s.batch, s.out_channels, *s.level_hw(i)), layout)
                                 for i in range(s.levels)]
        else:
            self.lateral_bytes = lateral_path_bytes(s, self.elem_bytes)
            self.lateral_flops = lateral_path_flops(s)
        self.shape_desc = s.describe()

    def provider_fn(self, provider):
        if provider == "eager":
            module = self.module
        elif provider.startswith("compile"):
            module = _compile(self.module, provider)
        else:
            module = FusedLateralPath(self.module, _fused_name(provider))
        if not self.needs_grad:
            return module
        # the fused path reads the same parameters
        return _train_step(module, list(self.module.parameters()), self.grad_outputs)


class FPNWorkload(Workload):
    """fpn_forward (no grad) and fpn_train (forward + backward of inputs and parameters)."""

    def __init__(self, case, dtype, layout, cfg, seed=0):
        super().__init__(case, dtype, layout, cfg, seed)
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
        s = self.shapes
        self.needs_grad = case == "fpn_train"
        torch.manual_seed(seed)  # the module's own init (kaiming_uniform_) uses the global generator
        self.tv = FeaturePyramidNetwork(list(s.in_channels), s.out_channels, extra_blocks=LastLevelMaxPool())
        self.tv = self._place(self.tv)
        names = [f"c{i + 2}" for i in range(s.levels)]

        def one():
            feats = OrderedDict()
            for i, (n, c) in enumerate(zip(names, s.in_channels)):
                t = _fmt(self.randn(s.batch, c, *s.level_hw(i)), layout)
                feats[n] = t.requires_grad_(self.needs_grad)
            return (feats,)
        self.make_sets(one)
        if self.needs_grad:  # fixed output gradients, one per output (P2..P5 + pool)
            with torch.no_grad():
                outs = _as_list(self.tv(self.input_sets[0][0]))
            self.grad_outputs = [_fmt(self.randn(*o.shape), layout) for o in outs]
        self.shape_desc = s.describe()

    def _place(self, m: nn.Module) -> nn.Module:
        m = m.to(device=self.device, dtype=self.dtype)
        if self.layout == "channels_last":
            m = m.to(memory_format=torch.channels_last)
        return m.train(self.needs_grad)

    def fused_module(self, backend: str) -> nn.Module:
        import fused_fpn
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
        s = self.shapes
        m = fused_fpn.FPN(list(s.in_channels), s.out_channels, extra_blocks=LastLevelMaxPool(), backend=backend)
        m.load_state_dict(self.tv.state_dict())
        return self._place(m)

    def provider_fn(self, provider):
        if provider == "eager":
            module = self.tv
        elif provider.startswith("compile"):
            module = _compile(self.tv, provider)
        else:
            module = self.fused_module(_fused_name(provider))
        if not self.needs_grad:
            return module
        owner = self.tv if provider == "eager" or provider.startswith("compile") else module
        return _train_step(module, list(owner.parameters()), self.grad_outputs)


class DetectorWorkload(Workload):
    """torchvision fasterrcnn_resnet50_fpn (random weights, eval), before/after swapping its FPN.

    fp16/bf16 run under torch.autocast (how a detector runs in reduced precision); parity compares
    the backbone+FPN features of the end-to-end call (final detections of a random-weight detector
    are not a stable thing to compare: a rounding-level change can reorder near-tied boxes)."""

    def __init__(self, case, dtype, layout, cfg, seed=0):
        super().__init__(case, dtype, layout, cfg, seed)
        from torchvision.models.detection import fasterrcnn_resnet50_fpn
        d = cfg.detector
        torch.manual_seed(seed)
        model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=d.min_size,
                                        max_size=d.max_size).eval().to(self.device)
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        self.model = model

        def one():
            return ([torch.rand(3, *d.image_hw, generator=self.gen, device=self.device) for _ in range(d.images)],)
        self.make_sets(one)
        self.shape_desc = (f"{d.images} image(s) {d.image_hw[0]}x{d.image_hw[1]}, "
                           f"transform min/max size {d.min_size}/{d.max_size}")
        self.swapped_with = None

    def converted(self, backend: str) -> nn.Module:
        import fused_fpn
        m = copy.deepcopy(self.model)
        if hasattr(fused_fpn, "convert"):
            out = fused_fpn.convert(m, backend=backend)
            m = out if isinstance(out, nn.Module) else m
            if isinstance(m.backbone.fpn, nn.Module):
                m.backbone.fpn = m.backbone.fpn.to(self.device)
                if self.layout == "channels_last":
                    m.backbone.fpn = m.backbone.fpn.to(memory_format=torch.channels_last)
            self.swapped_with = "fused_fpn.convert"
        else:
            old = m.backbone.fpn
            new = fused_fpn.FPN([b[0].in_channels for b in old.inner_blocks], old.inner_blocks[0][0].out_channels,
                                extra_blocks=old.extra_blocks, backend=backend)
            new.load_state_dict(old.state_dict())
            new = new.to(self.device).eval()
            if self.layout == "channels_last":
                new = new.to(memory_format=torch.channels_last)
            m.backbone.fpn = new
            self.swapped_with = "swap of model.backbone.fpn by hand"
        if not isinstance(m.backbone.fpn, fused_fpn.FPN):
            raise RuntimeError(f"after {self.swapped_with} the detector's FPN is {type(m.backbone.fpn).__name__}, "
                               f"not fused_fpn.FPN")
        return m

    def provider_fn(self, provider):
        if provider == "eager":
            model = self.model
        elif provider.startswith("compile"):  # the detector with its torchvision FPN compiled
            model = copy.deepcopy(self.model)
            model.backbone.fpn = _compile(model.backbone.fpn, provider)
        else:
            model = self.converted(_fused_name(provider))
        cast = self.dtype if self.dtype != torch.float32 else None
        device_type = self.device

        def run(images):
            if cast is None:
                return model(images)
            with torch.autocast(device_type, dtype=cast):
                return model(images)
        run.model = model
        return run

    def parity_outputs(self, fn, args) -> List[torch.Tensor]:
        """Run once with a hook on the backbone; the backbone+FPN features are what parity compares."""
        feats = {}
        handle = fn.model.backbone.register_forward_hook(lambda mod, inp, out: feats.update(out))
        try:
            fn(*args)
        finally:
            handle.remove()
        return list(feats.values())


WORKLOADS = {**{c: LateralLevelWorkload for c in LEVEL_CASES}, "lateral_path": LateralPathWorkload,
             "lateral_train": LateralPathWorkload,
             "fpn_forward": FPNWorkload, "fpn_train": FPNWorkload, "detector": DetectorWorkload}


def make_workload(case: str, dtype: str, layout: str, cfg: BenchConfig) -> Workload:
    if case not in WORKLOADS:
        raise ValueError(f"unknown benchmark case {case!r}; known: {list(WORKLOADS)}")
    return WORKLOADS[case](case, dtype, layout, cfg)


# --------------------------------------------------------------------------------------------
# One row: parity, timing, memory
# --------------------------------------------------------------------------------------------

OK, FAILED_PARITY, ERROR, NOT_RUN = "ok", "FAILED-PARITY", "ERROR", "NOT-RUN"
# why a row is NOT-RUN when the session ended early (the third reason is the time budget)
INTERRUPTED_BEFORE_TIMING = "the session ended while its workload was measured, before it was timed"
NOT_REACHED = "the session ended before this row was measured (interrupted, or stopped by -x)"


@dataclass
class Record:
    case: str
    dtype: str
    layout: str
    provider: str
    device: str
    status: str = OK
    message: str = ""
    shape: str = ""
    median_ms: Optional[float] = None
    p25_ms: Optional[float] = None
    p75_ms: Optional[float] = None
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    n_timed: int = 0
    input_sets: int = 0
    timing_method: str = ""
    peak_mem_bytes: Optional[int] = None
    bytes_min: Optional[int] = None
    bytes_provider: Optional[int] = None
    gbps: Optional[float] = None
    roofline_pct: Optional[float] = None
    tflops: Optional[float] = None   # lateral cases: the 1x1 convs' FLOPs / median time, in TFLOP/s
    speedup_vs_eager: Optional[float] = None
    speedup_vs_compile: Optional[float] = None
    parity_max_abs_err: Optional[float] = None
    parity_worst: Optional[float] = None
    parity_rel_l2: Optional[float] = None
    parity_tol: Optional[Tuple[float, float]] = None
    note: str = ""
    # fused Triton rows on a GPU: which config the autotuner chose for each kernel launch of the row
    # (``lateral_launch.describe_key`` -> ``describe_config``), e.g. whether a persistent config won
    triton_configs: Optional[Dict[str, str]] = None
    # seconds of the row's first (parity) call, synchronized: what a new shape costs before the timed
    # calls (Triton: compiling and autotuning every config; torch.compile: tracing and code generation)
    first_call_s: Optional[float] = None

    @property
    def key(self):
        return (self.case, self.dtype, self.layout)


class BenchRun:
    """State of one benchmark session: the config, the current workload, the records.

    All the providers of one workload (case x dtype x layout) are measured together, when the first
    of them is asked for (``run``): parity of each against eager, then interleaved timing of those that
    passed (``time_interleaved``), then peak memory of each. ``register`` tells which providers of each
    workload the session will ask for (the selected tests); without it a row is measured alone."""

    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.records: List[Record] = []
        self.started = time.monotonic()
        self.load_start = load_average()
        self._groups: Dict[tuple, List[str]] = {}
        self._asked = False                  # whether any row was asked for (a --collect-only session: none)
        # measured rows that pytest had not asked for when their workload was left, by (key, provider):
        # reported by ``close`` unless asked for (and measured again) later
        self._unclaimed: Dict[tuple, Record] = {}
        self._pending: Dict[str, Tuple[Record, Optional[Callable], Optional[tuple]]] = {}
        self._pending_key = None
        self._workload: Optional[Workload] = None
        self._workload_key = None
        self._reference: Optional[List[torch.Tensor]] = None
        self._reference_first_call_s: Optional[float] = None
        self._ceiling: Optional[Ceiling] = None

    # ---- session-level pieces
    def register(self, specs: Sequence[RowSpec]) -> None:
        for spec in specs:
            group = self._groups.setdefault(spec.key, [])
            if spec.provider not in group:
                group.append(spec.provider)

    def ceiling(self) -> Ceiling:
        if self._ceiling is None:
            self._ceiling = measure_copy_ceiling(self.cfg.device, self.cfg.quick)
        return self._ceiling

    def budget_left(self) -> Optional[float]:
        if self.cfg.budget_s is None:
            return None
        return self.cfg.budget_s - (time.monotonic() - self.started)

    def workload(self, spec: RowSpec) -> Workload:
        """The workload of ``spec`` (built once per key; the previous one is dropped, and torch.compile's
        caches reset so each workload compiles fresh, with static shapes, within the recompile limit)."""
        if self._workload_key != spec.key:
            self._drop_workload()
            self._workload = make_workload(spec.case, spec.dtype, spec.layout, self.cfg)
            self._workload_key = spec.key
        return self._workload

    def _drop_workload(self) -> None:
        self._workload = None
        self._workload_key = None
        self._reference = None
        torch._dynamo.reset()
        if self.cfg.device == "cuda":
            torch.cuda.empty_cache()

    def _outputs(self, w: Workload, fn: Callable, args: tuple) -> List[torch.Tensor]:
        with torch.set_grad_enabled(w.needs_grad):
            if isinstance(w, DetectorWorkload):
                outs = w.parity_outputs(fn, args)
            else:
                outs = w.outputs(fn(*args))
        return [o.detach() for o in outs]

    def reference(self, w: Workload) -> List[torch.Tensor]:
        """Eager's outputs on the first input set: its first call on the workload, timed
        (``_reference_first_call_s``: eager's first_call_s, as the other providers' first calls are)."""
        if self._reference is None:
            start = time.perf_counter()
            self._reference = self._outputs(w, w.provider_fn("eager"), w.input_sets[0])
            _sync(self.cfg.device)
            self._reference_first_call_s = time.perf_counter() - start
        return self._reference

    # ---- rows
    def run(self, spec: RowSpec) -> Tuple[Record, Optional[Callable], Optional[tuple]]:
        """The measured row of ``spec``: (record, once, args), where once(*args) is one synchronized call
        to hand to pytest-benchmark (None when the row was not timed). The record joins ``records``."""
        self._asked = True
        if self._pending_key != spec.key or spec.provider not in self._pending:
            group = self._groups.get(spec.key) or [spec.provider]
            if spec.provider not in group or self._pending_key == spec.key:
                group = [spec.provider]  # asked again, or outside the registered group: measure it alone
            if self._pending_key != spec.key:
                self._flush_pending()
                self._pending_key = spec.key
            self._measure(spec, group)
        rec, once, args = self._pending.pop(spec.provider)
        self._unclaimed.pop((spec.key, spec.provider), None)
        self.records.append(rec)
        return rec, once, args

    def _measure(self, spec: RowSpec, providers: List[str]) -> None:
        recs = {p: Record(spec.case, spec.dtype, spec.layout, p, self.cfg.device) for p in providers}
        left = self.budget_left()
        if left is not None and left <= 0:
            if self._workload_key != spec.key:
                self._drop_workload()
            for rec in recs.values():
                rec.status, rec.message = NOT_RUN, f"time budget of {self.cfg.budget_s:g} s used up"
                self._pending[rec.provider] = (rec, None, None)
            return
        try:
            w = self.workload(spec)
            ref = self.reference(w)
        except Exception as exc:  # noqa: BLE001 - every row of the workload reports it
            for rec in recs.values():
                rec.status, rec.message = ERROR, f"building the workload: {type(exc).__name__}: {exc}"
                self._pending[rec.provider] = (rec, None, None)
            return
        fns: Dict[str, Callable] = {}
        for p, rec in recs.items():
            self._pending[p] = (rec, None, None)
            rec.shape = getattr(w, "shape_desc", "")
            try:
                if p == EXPERIMENTAL_PROVIDER:
                    fn = with_experimental_configs(w.provider_fn("fused-triton"))
                else:
                    fn = w.provider_fn(p)
                start = time.perf_counter()
                with recording_triton_choices() as chosen:
                    outs = self._outputs(w, fn, w.input_sets[0])   # the first call also compiles (and autotunes)
                _sync(self.cfg.device)
                # eager's first call on this workload was the reference's; this one found it warm
                rec.first_call_s = self._reference_first_call_s if p == "eager" else time.perf_counter() - start
                rec.triton_configs = dict(chosen) or None
            except Exception as exc:  # noqa: BLE001 - reported in the row, failed by the caller
                rec.status, rec.message = ERROR, f"{type(exc).__name__}: {exc}"
                continue
            par = check_parity(outs, ref, w.dtype, self.cfg.device)
            del outs
            rec.parity_max_abs_err, rec.parity_worst, rec.parity_rel_l2 = par.max_abs_err, par.worst, par.rel_l2
            rec.parity_tol = (par.atol, par.rtol)
            if isinstance(w, DetectorWorkload) and p.startswith("fused-"):
                rec.note = w.swapped_with or ""
            if not par.ok:
                rec.status, rec.message = FAILED_PARITY, par.message
                continue
            fns[p] = fn
        try:
            with torch.set_grad_enabled(w.needs_grad):
                timings = time_interleaved(fns, w.input_sets, self.cfg.device, self.cfg.timing)
        except Exception as exc:  # noqa: BLE001
            for p in fns:
                recs[p].status, recs[p].message = ERROR, f"while timing: {type(exc).__name__}: {exc}"
            return
        for p, fn in fns.items():
            rec, timing = recs[p], timings[p]
            try:
                with torch.set_grad_enabled(w.needs_grad):
                    rec.peak_mem_bytes = peak_memory(fn, w.input_sets[0], self.cfg.device)
            except Exception as exc:  # noqa: BLE001
                rec.status, rec.message = ERROR, f"while measuring memory: {type(exc).__name__}: {exc}"
                continue
            rec.median_ms, rec.p25_ms, rec.p75_ms = timing.median_s * 1e3, timing.p25_s * 1e3, timing.p75_s * 1e3
            rec.min_ms, rec.max_ms, rec.n_timed = timing.min_s * 1e3, timing.max_s * 1e3, timing.n
            rec.timing_method, rec.input_sets = timing.method, len(w.input_sets)
            if w.lateral_bytes is not None:
                rec.bytes_min = w.lateral_bytes["fused"]
                rec.bytes_provider = w.bytes_for(p)
                rec.gbps, rec.roofline_pct = roofline(rec.bytes_min, timing.median_s, self.ceiling().bytes_per_s)
                rec.tflops = w.lateral_flops / timing.median_s / 1e12
            self._pending[p] = (rec, self._once(fn, w.needs_grad), w.input_sets[0])

    def _flush_pending(self) -> None:
        """Rows of the current workload that pytest has not asked for become unclaimed: as measured, or
        NOT-RUN if the measuring was interrupted before their timing."""
        for rec, _, _ in self._pending.values():
            if rec.status == OK and rec.median_ms is None:
                rec.status, rec.message = NOT_RUN, INTERRUPTED_BEFORE_TIMING
            self._unclaimed[(rec.key, rec.provider)] = rec
        self._pending, self._pending_key = {}, None

    def _once(self, fn: Callable, needs_grad: bool) -> Callable:
        device = self.cfg.device

        def once(*args):
            with torch.set_grad_enabled(needs_grad):
                fn(*args)
            _sync(device)
        return once

    def close(self) -> None:
        """End the session (idempotent). Rows that pytest never got because the session ended early
        (interrupted, a timeout's SIGINT, ``-x``) still join ``records``: one measured with its workload
        but not yet handed to pytest as it was measured; one whose workload was interrupted before
        it was timed as NOT-RUN (with its first call and parity, if it got that far); a registered row
        never reached as NOT-RUN (none if no row was asked for: a --collect-only or --benchmark-skip
        session). A row is reported once, as pytest got it if it did. Then the workload is dropped."""
        self._flush_pending()
        seen = {(r.key, r.provider) for r in self.records}
        for k, rec in self._unclaimed.items():
            if k not in seen:
                self.records.append(rec)
                seen.add(k)
        for key, providers in self._groups.items() if self._asked else ():
            for provider in providers:
                if (key, provider) not in seen:
                    self.records.append(Record(*key, provider, self.cfg.device, status=NOT_RUN, message=NOT_REACHED))
        self._unclaimed = {}
        self._workload = None
        self._workload_key = None
        self._reference = None


# --------------------------------------------------------------------------------------------
# Results: speedups, table, JSON, PNG
# --------------------------------------------------------------------------------------------

MIXED_TIMING_NOTE = "timed as eager calls (graph capture failed): no ratio against graph-replayed rows"


def _graph_replayed(r: Record) -> bool:
    return r.timing_method.startswith(GRAPH_REPLAY_METHOD)


def finalize(records: Sequence[Record]) -> None:
    """Fill speedup_vs_eager / speedup_vs_compile of every timed row (same case, dtype, layout), from
    rows timed the same way: in a graph-replay run a provider whose capture failed was timed as eager
    calls (launch overhead included), so no ratio is given between it and a replayed row (a note says
    why)."""
    by_key: Dict[tuple, Dict[str, Record]] = {}
    for r in records:
        by_key.setdefault(r.key, {})[r.provider] = r
    for r in records:
        r.speedup_vs_eager = r.speedup_vs_compile = None
        if r.status != OK or r.median_ms is None:
            continue
        if r.note == MIXED_TIMING_NOTE:
            r.note = ""
        for base, field in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
            other = by_key[r.key].get(base)
            if other is None or other.status != OK or not other.median_ms:
                continue
            if _graph_replayed(other) != _graph_replayed(r):
                failed = other if _graph_replayed(r) else r
                if not failed.note:
                    failed.note = MIXED_TIMING_NOTE
                continue
            setattr(r, field, other.median_ms / r.median_ms)


def target_checks(records: Sequence[Record], device: str, quick: bool = False) -> List[Dict[str, object]]:
    """The foundation issue's CPU targets at the CPU default shapes (not --quick): the fused cpu lateral
    path >= 1.25x eager; the whole FPN forward not slower than eager."""
    if device != "cpu" or quick:
        return []
    checks = []
    for case, target in (("lateral_path", 1.25), ("fpn_forward", 1.0)):
        for r in records:
            if r.case == case and r.provider == "fused-cpu" and r.dtype == "fp32" and r.layout == "nchw":
                met = r.speedup_vs_eager is not None and r.speedup_vs_eager >= target
                checks.append({"check": f"{case} fused-cpu vs eager", "target": target,
                               "ratio": r.speedup_vs_eager, "met": bool(met), "status": r.status})
    return checks


def device_info(device: str) -> Dict[str, object]:
    if device == "cuda":
        name = torch.cuda.get_device_name(torch.cuda.current_device())
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        slug = _slug(name)
        return {"type": "cuda", "name": name, "slug": slug, "capability": list(torch.cuda.get_device_capability()),
                "memory_bytes": int(props.total_memory), "l2_bytes": cache_bytes("cuda")}
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    short = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$|processor", " ", name, flags=re.I)
    return {"type": "cpu", "name": name, "slug": f"cpu-{_slug(short)}-{threads}t", "threads": threads,
            "llc_bytes": cache_bytes("cpu")}


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "unknown"


def versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchvision", "triton", "fused_fpn"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent is a fine answer
            out[mod] = None
    out["cuda"] = torch.version.cuda
    try:
        import fused_fpn
        out["fused_fpn_backends"] = ",".join(fused_fpn.available_backends())
    except Exception:  # noqa: BLE001
        out["fused_fpn_backends"] = None
    return out


def build_report(run_or_records, cfg: BenchConfig, ceiling: Optional[Ceiling]) -> Dict[str, object]:
    records = run_or_records.records if isinstance(run_or_records, BenchRun) else list(run_or_records)
    finalize(records)
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "schema": SCHEMA,
        "date": now.strftime("%Y-%m-%d"),
        "timestamp": now.isoformat(timespec="seconds"),
        "command": cfg.command,
        "device": device_info(cfg.device),
        "versions": versions(),
        "config": {
            "quick": cfg.quick,
            "shapes": cfg.shapes.describe(),
            "detector": asdict(cfg.detector),
            "timing": asdict(cfg.timing),
            "memory_measure": MEMORY_MEASURE[cfg.device],
            "gbps_definition": "bytes_min (the fused op's minimum bytes: read x, W, bias and top once, write y once; "
                               "benchmarks/harness.py lateral_bytes) / median time, "
                               "for every provider; bytes_provider is what that provider's own algorithm moves",
            "parity_tolerances": {DTYPE_NAMES[d]: list(parity_tolerance(d, cfg.device)) for d in PARITY_TOL},
            "cudnn_allow_tf32": conv_allows_tf32(),
            "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "max_autotune": cfg.max_autotune,
            "budget_s": cfg.budget_s,
            "cases": {c: CASE_DOC[c] for c in CASES},
        },
        "ceiling": None if ceiling is None else asdict(ceiling),
        "load": {"cores": os.cpu_count(),
                 "start": run_or_records.load_start if isinstance(run_or_records, BenchRun) else None,
                 "end": load_average()},
        "targets": target_checks(records, cfg.device, cfg.quick),
        "results": [asdict(r) for r in records],
    }


REQUIRED_RECORD_KEYS = ("case", "dtype", "layout", "provider", "status", "median_ms", "p25_ms", "p75_ms",
                        "peak_mem_bytes", "speedup_vs_eager", "speedup_vs_compile", "gbps", "roofline_pct")


def validate_report(report: Dict[str, object]) -> None:
    """Raise ValueError if ``report`` does not follow the schema this module writes."""
    for key in ("schema", "date", "command", "device", "versions", "config", "ceiling", "load", "targets", "results"):
        if key not in report:
            raise ValueError(f"benchmark report lacks {key!r}")
    if report["schema"] != SCHEMA:
        raise ValueError(f"benchmark report schema is {report['schema']!r}, expected {SCHEMA!r}")
    if not isinstance(report["results"], list):
        raise ValueError("benchmark report 'results' must be a list")
    for i, r in enumerate(report["results"]):
        missing = [k for k in REQUIRED_RECORD_KEYS if k not in r]
        if missing:
            raise ValueError(f"result {i} lacks {missing}")
        if r["status"] == OK and (r["median_ms"] is None or r["median_ms"] <= 0):
            raise ValueError(f"result {i} is ok but has no positive median_ms")
        if r["status"] != OK and r["speedup_vs_eager"] is not None:
            raise ValueError(f"result {i} has status {r['status']} but reports a speedup")


def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def format_table(report: Dict[str, object], markdown: bool = False) -> str:
    """The results table (plain text for the terminal, or markdown for the README)."""
    head = ["case", "dtype", "layout", "provider", "median ms", "p25-p75 ms", "vs eager", "vs compile",
            "peak MB", "GB/s", "% ceil", "TFLOP/s", "status"]
    rows = []
    for r in report["results"]:
        spread = "" if r["p25_ms"] is None else f"{r['p25_ms']:.3g}-{r['p75_ms']:.3g}"
        status = r["status"] if r["status"] == OK else f"{r['status']}: {r['message']}"[:80]
        rows.append([r["case"], r["dtype"], r["layout"], r["provider"], _f(r["median_ms"], ".4g"), spread,
                     _f(r["speedup_vs_eager"], ".2f") + ("x" if r["speedup_vs_eager"] is not None else ""),
                     _f(r["speedup_vs_compile"], ".2f") + ("x" if r["speedup_vs_compile"] is not None else ""),
                     _f(None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2 ** 20, ".1f"),
                     _f(r["gbps"], ".1f"), _f(r["roofline_pct"], ".1f"), _f(r.get("tflops"), ".3g"), status])
    dev = report["device"]
    ceil = report.get("ceiling")
    lines = []
    where = dev["name"] + (f", {dev['threads']} thread{'s' if dev['threads'] != 1 else ''}" if "threads" in dev else "")
    title = (f"fused_fpn benchmarks on {where} ({report['date']}; torch {report['versions']['torch']}; "
             f"{report['config']['shapes']}{'; QUICK' if report['config']['quick'] else ''})")
    if markdown:
        lines.append(f"**{title}**  ")
        lines.append(f"Command: `{report['command']}`  ")
        lines.append("")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for row in rows:
            lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
        lines.append("")
    else:
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
        lines.append(title)
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        lines.append("  ".join("-" * w for w in widths))
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    notes = [f"peak memory: {report['config']['memory_measure']}",
             "GB/s and % ceil (lateral cases): the fused op's minimum bytes / median time, against "
             + (f"a copy-bandwidth ceiling of {ceil['bytes_per_s'] / 1e9:.1f} GB/s ({ceil['method']})" if ceil
                else "no ceiling (no lateral case ran)"),
             "TFLOP/s (lateral cases): the 1x1 convs' 2 * N*H*W * Cin * Cout / median time (on an H200 the "
             "levels sit near the ridge, P4 / P5 past it: tensor-core throughput bounds them as much as bytes)",
             "median over timed calls (" + ", ".join(sorted({r['timing_method'] for r in report['results']
                                                              if r['timing_method']})) + ")"]
    load = report.get("load") or {}
    if report["device"]["type"] == "cpu" and load.get("start") is not None:
        notes.append(f"1-min load average {load['start']:.2f} at the start, {load['end']:.2f} at the end, "
                     f"{load['cores']} cores")
        if load["start"] > 0.5 * (load["cores"] or 1):
            notes.append("WARNING: other processes were using the CPU when this run started; with several "
                         "threads per op the timings are then unreliable")
    for chk in report.get("targets", []):
        ratio = "n/a" if chk["ratio"] is None else f"{chk['ratio']:.2f}x"
        notes.append(f"target {chk['check']}: {ratio} (target >= {chk['target']:.2f}x: "
                     f"{'MET' if chk['met'] else 'NOT MET'})")
    notes += [f"{r['case']} {r['dtype']} {r['layout']} {r['provider']}: {MIXED_TIMING_NOTE}"
              for r in report["results"] if r.get("note") == MIXED_TIMING_NOTE]
    notes += triton_config_notes(report["results"])
    notes += first_call_notes(report["results"])
    for n in notes:
        lines.append(("- " if markdown else "* ") + n)
    return "\n".join(lines)


def recording_triton_choices():
    """A block that collects the configs the Triton autotuner picks for the launches inside it
    (``lateral_launch.recording_autotune_choices``: GPU, eager launches), or records nothing where the
    Triton backend cannot be imported."""
    try:
        from fused_fpn.kernels import lateral_launch
    except Exception:  # noqa: BLE001 - no triton: nothing to record
        return contextlib.nullcontext({})
    return lateral_launch.recording_autotune_choices()


def triton_config_notes(results: Sequence[Dict[str, object]], max_rows: int = 4) -> List[str]:
    """One note per (kernel launch, chosen config) seen in the rows' ``triton_configs``, naming the rows
    (case/layout/provider; the dtype is in the launch's description) that ran it."""
    rows: Dict[Tuple[str, str], List[str]] = OrderedDict()
    for r in results:
        for launch, config in (r.get("triton_configs") or {}).items():
            rows.setdefault((launch, config), []).append(f"{r['case']}/{r['layout']}/{r['provider']}")
    notes = []
    for (launch, config), names in rows.items():
        more = f" and {len(names) - max_rows} more" if len(names) > max_rows else ""
        notes.append(f"triton autotune: {launch}: {config} ({', '.join(names[:max_rows])}{more})")
    return notes


def first_call_notes(results: Sequence[Dict[str, object]], min_s: float = 1.0) -> List[str]:
    """One note per workload (case, dtype, layout) whose first call took at least ``min_s`` seconds for
    some provider: every provider's first-call seconds (compile and autotune cost; not a timing of
    the op)."""
    rows: Dict[Tuple[str, str, str], List[Tuple[str, float]]] = OrderedDict()
    for r in results:
        if r.get("first_call_s") is not None:
            rows.setdefault((r["case"], r["dtype"], r["layout"]), []).append((r["provider"], r["first_call_s"]))
    return [f"first call (compiles, autotunes), s: {case} {dtype} {layout}: "
            + ", ".join(f"{p} {t:.1f}" for p, t in firsts)
            for (case, dtype, layout), firsts in rows.items() if max(t for _, t in firsts) >= min_s]


def result_paths(cfg: BenchConfig, report: Dict[str, object]) -> Dict[str, str]:
    """<device-slug>_<date>[_cudagraphs][_quick][_subset][_partial].{json,png,md}: a run filtered by
    case, provider, dtype or layout is marked _subset, one with NOT-RUN rows (the time budget ran out,
    or the session ended early) _partial, and a GPU run that timed CUDA-graph replays
    (FUSED_FPN_BENCH_CUDA_GRAPHS=1) _cudagraphs, so that none of them overwrites the day's full
    eager-call run."""
    subset = any(f is not None for f in (cfg.cases, cfg.providers, cfg.dtypes, cfg.layouts))
    partial = any(r["status"] == NOT_RUN for r in report["results"])
    graphs = report["device"].get("type") == "cuda" and cuda_graph_timing()
    stem = (f"{report['device']['slug']}_{report['date']}" + ("_cudagraphs" if graphs else "")
            + ("_quick" if cfg.quick else "") + ("_subset" if subset else "") + ("_partial" if partial else ""))
    return {ext: os.path.join(cfg.results_dir, f"{stem}.{ext}") for ext in ("json", "png", "md")}


def write_results(report: Dict[str, object], cfg: BenchConfig) -> Dict[str, str]:
    """Write the .json / .png / .md of ``result_paths`` under cfg.results_dir; returns the paths."""
    validate_report(report)
    paths = result_paths(cfg, report)
    os.makedirs(cfg.results_dir, exist_ok=True)
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_finite(report), f, indent=1, default=_json_default, allow_nan=False)
        f.write("\n")
    os.replace(tmp, paths["json"])
    with open(paths["md"], "w") as f:
        f.write(format_table(report, markdown=True) + "\n")
    write_chart(report, paths["png"])
    return paths


def _finite(o):
    """The report with every non-finite float (e.g. a failed parity's inf) as None: strict JSON."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_chart(report: Dict[str, object], path: str) -> None:
    """PNG: speedup vs eager per case (one bar per provider), and % of the copy ceiling for the lateral cases."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if r["status"] == OK]
    keys = list(OrderedDict.fromkeys((r["case"], r["dtype"], r["layout"]) for r in report["results"]))
    providers = [p for p in OrderedDict.fromkeys(r["provider"] for r in report["results"])]
    lat_keys = [k for k in keys if k[0] == "lateral_path" or k[0] in LEVEL_CASES]
    fig_h = max(4.0, 0.45 * (len(keys) + len(lat_keys)) + 2)
    fig, axes = plt.subplots(1, 2, figsize=(15, fig_h))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 0.8 / max(1, len(providers))
    for ax, ks, field_name, xlabel in ((axes[0], keys, "speedup_vs_eager", "speedup vs torchvision eager (x)"),
                                       (axes[1], lat_keys, "roofline_pct", "% of the copy-bandwidth ceiling")):
        for pi, prov in enumerate(providers):
            ys, vals = [], []
            for ki, k in enumerate(ks):
                r = next((r for r in results
                          if (r["case"], r["dtype"], r["layout"]) == k and r["provider"] == prov), None)
                if r is not None and r[field_name] is not None:
                    ys.append(ki + pi * width)
                    vals.append(r[field_name])
            if vals:
                bars = ax.barh(ys, vals, height=width, label=prov if ax is axes[0] else None,
                               color=colors[pi % len(colors)])
                if len(ks) * len(providers) <= 80:
                    ax.bar_label(bars, fmt="%.2f" if field_name == "speedup_vs_eager" else "%.1f", fontsize=6,
                                 padding=1)
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(ks))])
        ax.set_yticklabels([f"{c} {d} {lay}" for c, d, lay in ks], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        if field_name == "speedup_vs_eager":
            ax.axvline(1.0, color="k", lw=0.8)
        ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="upper center", ncol=max(1, len(providers)), fontsize=8, bbox_to_anchor=(0.5, 0.97))
    if not lat_keys:
        axes[1].text(0.5, 0.5, "no lateral case ran", ha="center", va="center", transform=axes[1].transAxes)
    fig.suptitle(f"fused_fpn on {report['device']['name']} ({report['date']}), {report['config']['shapes']}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
