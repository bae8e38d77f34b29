"""Hardware counters (Nsight Compute) of each provider's lateral forward kernels, level by level.

Three runs of this script, which ``gpu_run.sh``'s opt-in ``ncu`` step makes:

    python benchmarks/kernel_profile.py --plan PLAN.json            # the kernels each region launches
    ncu $(python benchmarks/kernel_profile.py --ncu-args) \\
        python benchmarks/kernel_profile.py > NCU.csv                # the same regions, profiled
    python benchmarks/kernel_profile.py --summarize NCU.csv --plan PLAN.json

A region is one forward call of one provider on one level of the GPU benchmark's shapes (batch 2,
800x1216, ResNet-50 channels -> 256; fp16 channels_last unless told): ``eager`` (torchvision's conv2d +
interpolate + add), ``compile`` (torch.compile of that), ``cuda`` and ``triton`` (``fused_fpn.lateral``);
with ``--backward`` also each backward piece of ``backward_breakdown.py`` (eager, cuda, triton).
Every region is warmed up first (Triton autotuning, torch.compile) outside the profiled ranges; each
region then runs once between ``cudaProfilerStart`` and ``cudaProfilerStop`` so ncu profiles only it.

ncu's CSV names kernels, not regions: the plan run records each region's kernel names with
torch.profiler (no profiler runs under ncu), and the summary assigns ncu's rows to regions in order,
checking the names. Per kernel it prints duration, DRAM bytes and GB/s, DRAM and SM throughput (% of
peak), achieved occupancy, registers, dynamic shared memory, L2 hit rate and the largest warp stall
reasons: what to change in a kernel that is far from the bandwidth floor.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import harness  # noqa: E402

PROVIDERS = ("eager", "compile", "cuda", "triton")
# ncu sections and extra metrics the summary reads (gpu_run.sh passes them to ncu)
NCU_SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats")
NCU_METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_sector_hit_rate.pct",
               "gpu__time_duration.sum")

# (column, label, kind) of the summary; kind: time (-> us), bytes (-> MB), kbytes (-> KB) or plain;
# "a|b": the first of these metric names that the CSV has (names differ across ncu versions)
SUMMARY_COLUMNS = (
    ("gpu__time_duration.sum", "us", "time"),
    ("dram__bytes_read.sum", "DRAM rd MB", "bytes"),
    ("dram__bytes_write.sum", "DRAM wr MB", "bytes"),
    ("gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed", "mem %", "plain"),
    ("dram__throughput.avg.pct_of_peak_sustained_elapsed|gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
     "DRAM %", "plain"),
    ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "SM %", "plain"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "occ %", "plain"),
    ("launch__registers_per_thread", "regs", "plain"),
    ("launch__shared_mem_per_block_dynamic", "smem KB", "kbytes"),
    ("lts__t_sector_hit_rate.pct", "L2 hit %", "plain"),
)
_STALL = re.compile(r"^smsp__average_warps?_(?:latency_)?issue_stalled_(\w+?)_per_issue_active\.ratio$")
_TIME_SCALE = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}       # -> us
_BYTE_SCALE = {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3, "Tbyte": 1e6,
               "KB": 1e-3, "MB": 1.0, "GB": 1e3}                                          # -> MB


# ---------------------------------------------------------------- summary (no GPU needed)

def parse_ncu_raw_csv(text: str) -> Tuple[List[Dict[str, str]], Dict[str, str]]:
    """(rows, units) of ``ncu --csv --page raw``: a header row of metric names, then (in the ncu
    versions seen so far) a row of units whose "ID" is empty, then one row per profiled kernel.
    Lines before the header (the profiled program's own output, ncu's ==PROF== notes) are skipped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError('no ncu raw CSV header (a line starting with "ID") in the input')
    table = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    units: Dict[str, str] = {}
    if table and not table[0].get("ID", "").strip():
        units = {k: (v or "").strip() for k, v in table[0].items()}
        table = table[1:]
    rows = [r for r in table if r.get("ID", "").strip().isdigit()]
    rows.sort(key=lambda r: int(r["ID"]))
    return rows, units


def _number(text: Optional[str]) -> Optional[float]:
    if text is None:
        return None
    text = text.strip().replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def metric(row: Dict[str, str], units: Dict[str, str], name: str, kind: str) -> Optional[float]:
    """One metric of a kernel row in the summary's units (time: us; bytes: MB; kbytes: KB), None if
    absent; a value without a unit is taken in ncu's base unit (nsecond, byte)."""
    name = next((n for n in name.split("|") if n in row), name)
    value = _number(row.get(name))
    if value is None:
        return None
    unit = units.get(name, "")
    if kind == "time":
        return value * _TIME_SCALE.get(unit, 1e-3)        # ncu's raw default unit is nsecond
    if kind == "bytes":
        return value * _BYTE_SCALE.get(unit, 1e-6)        # and byte
    if kind == "kbytes":
        return value * _BYTE_SCALE.get(unit, 1e-6) * 1e3
    return value


def top_stalls(row: Dict[str, str], count: int = 3) -> List[Tuple[str, float]]:
    """The ``count`` largest warp stall reasons (cycles per issued instruction) of a kernel row."""
    stalls = []
    for name, text in row.items():
        match = _STALL.match(name or "")
        value = _number(text)
        if match and value is not None and value > 0:
            stalls.append((match.group(1), value))
    return sorted(stalls, key=lambda s: -s[1])[:count]


def _base_name(name: str) -> str:
    """"void fused_fpn::cuda::lateral_fwd_kernel<__half, ...>(...)" -> "lateral_fwd_kernel"."""
    name = re.sub(r"^void\s+", "", name.strip())
    name = re.split(r"[<(]", name, maxsplit=1)[0]
    return name.rsplit("::", 1)[-1]


def assign_regions(plan: Sequence[dict], rows: Sequence[Dict[str, str]]) -> Tuple[List[Tuple[str, dict]], List[str]]:
    """Label ncu's kernel rows with the plan's regions, in order. Returns ([(region, row)], problems):
    a count mismatch or a kernel whose name differs from the plan's is reported, not hidden."""
    problems = []
    expected = sum(len(region["kernels"]) for region in plan)
    if expected != len(rows):
        problems.append(f"the plan expects {expected} kernels, ncu profiled {len(rows)}: labels may be off")
    labelled, i = [], 0
    for region in plan:
        for planned in region["kernels"]:
            if i >= len(rows):
                return labelled, problems
            got = rows[i].get("Kernel Name", "")
            if _base_name(planned) != _base_name(got):
                problems.append(f"{region['label']}: planned kernel {_base_name(planned)!r}, ncu row {i} is "
                                f"{_base_name(got)!r}")
            labelled.append((region["label"], rows[i]))
            i += 1
    for row in rows[i:]:
        labelled.append(("(unplanned)", row))
    return labelled, problems


def summary_lines(plan: Sequence[dict], rows: Sequence[Dict[str, str]], units: Dict[str, str]) -> List[str]:
    """The per-kernel table, then per region the summed duration."""
    labelled, problems = assign_regions(plan, rows)
    width = max([14] + [len(label) for label, _ in labelled])
    head = f"{'region':<{width}s} {'kernel':<34s} " + " ".join(f"{label:>10s}" for _, label, _ in SUMMARY_COLUMNS)
    lines = [head + "  DRAM GB/s  top stalls (cycles/issue)"]
    totals: Dict[str, float] = {}
    for label, row in labelled:
        values = [metric(row, units, name, kind) for name, _, kind in SUMMARY_COLUMNS]
        cells = " ".join(f"{v:10.1f}" if v is not None else f"{'n/a':>10s}" for v in values)
        us, rd, wr = values[0], values[1], values[2]
        gbs = (rd + wr) / us * 1e3 if None not in (us, rd, wr) and us > 0 else None   # MB/us -> GB/s
        stalls = ", ".join(f"{n} {v:.1f}" for n, v in top_stalls(row))
        name = _base_name(row.get("Kernel Name", "?"))[:34]
        lines.append(f"{label:<{width}s} {name:<34s} {cells}  {gbs if gbs is None else round(gbs):>9}  {stalls}")
        if us is not None:
            totals[label] = totals.get(label, 0.0) + us
    lines.append("")
    lines += [f"{label:<{width}s} kernels' duration in all: {us:9.1f} us" for label, us in totals.items()]
    lines += [f"WARNING: {p}" for p in problems]
    return lines


# ---------------------------------------------------------------- regions (GPU)

def ncu_args() -> List[str]:
    """The ncu options the profiled run needs: profile only between cudaProfilerStart/Stop (the
    regions), leave the clocks alone (the device notes' rule), one raw CSV row per kernel."""
    args = ["--profile-from-start", "off", "--clock-control", "none", "--target-processes", "application-only",
            "--csv", "--page", "raw"]
    for section in NCU_SECTIONS:
        args += ["--section", section]
    return args + ["--metrics", ",".join(NCU_METRICS)]


def _providers(text: str) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(t not in PROVIDERS for t in names):
        raise argparse.ArgumentTypeError(f"providers are {', '.join(PROVIDERS)} (comma list), got {text!r}")
    return names


def build_regions(levels: Sequence[int], providers: Sequence[str], dtype_name: str, layout: str,
                  backward: bool = False, device: str = "cuda") -> List[Tuple[str, Callable[[], object]]]:
    """(label, call) per level and provider, on CUDA tensors of the GPU benchmark's shapes: the forward,
    and with ``backward`` the backward pieces of ``backward_breakdown.level_pieces`` (eager's conv and
    upsample backward, cuda's dx / dW / db+dtop, triton's dx / dW / db+dtop / all four). ``device``
    other than cuda only for tests (eager regions on CPU)."""
    import torch
    import fused_fpn

    dtype = harness.DTYPES[dtype_name]
    shapes = harness.GPU_SHAPES
    regions = []
    for i in levels:
        n, cin, cout = shapes.batch, shapes.in_channels[i], shapes.out_channels
        h, w = shapes.level_hw(i)
        g = torch.Generator().manual_seed(i)
        x = harness._fmt(torch.randn((n, cin, h, w), generator=g), layout).to(device, dtype)
        weight = (torch.randn((cout, cin, 1, 1), generator=g) / cin ** 0.5).to(device, dtype)
        bias = torch.randn((cout,), generator=g).to(device, dtype)
        top = None
        if i + 1 < shapes.levels:
            th, tw = shapes.level_hw(i + 1)
            top = harness._fmt(torch.randn((n, cout, th, tw), generator=g), layout).to(device, dtype)
        compiled = torch.compile(harness.eager_lateral, dynamic=False)
        for provider in providers:
            if provider == "eager":
                call = (lambda x=x, w=weight, b=bias, t=top: harness.eager_lateral(x, w, b, t))
            elif provider == "compile":
                call = (lambda f=compiled, x=x, w=weight, b=bias, t=top: f(x, w, b, t))
            else:
                call = (lambda p=provider, x=x, w=weight, b=bias, t=top: fused_fpn.lateral(x, w, b, t, backend=p))
            regions.append((f"P{i + 2} {provider}", call))
        if backward:
            import backward_breakdown
            dy = harness._fmt(torch.randn((n, cout, h, w), generator=g), layout).to(device, dtype)
            top_hw = shapes.level_hw(i + 1) if i + 1 < shapes.levels else None
            fused = [p for p in providers if p in ("cuda", "triton")]
            for provider, piece, fn in backward_breakdown.level_pieces(fused, cout, top_hw, weight[:, :, 0, 0]):
                if provider in providers:
                    regions.append((f"P{i + 2} {provider} bwd {piece}", lambda fn=fn, x=x, dy=dy: fn(x, dy)))
    return regions


def kernel_names(call: Callable[[], object]) -> List[str]:
    """The CUDA kernels one call launches, in launch order (torch.profiler; memcpy/memset left out)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    return [e.name for e in sorted(kernels, key=lambda e: e.time_range.start)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=harness.parse_levels, default=[0, 3], metavar="P2,P5", help="default: P2,P5")
    parser.add_argument("--providers", type=_providers, default=list(PROVIDERS), metavar="eager,compile,cuda,triton")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--layout", default="channels_last", choices=("channels_last", "nchw"))
    parser.add_argument("--backward", action="store_true", help="also the backward pieces of each level")
    parser.add_argument("--plan", help="with --summarize: the plan to read; otherwise: record the plan here")
    parser.add_argument("--summarize", metavar="NCU_CSV", help="print the summary of an ncu raw CSV")
    parser.add_argument("--ncu-args", action="store_true", help="print the ncu options for the profiled run")
    args = parser.parse_args(argv)

    if args.ncu_args:
        print(" ".join(ncu_args()))
        return 0
    if args.summarize:
        if not args.plan:
            parser.error("--summarize needs --plan")
        with open(args.plan) as f:
            plan = json.load(f)["regions"]
        with open(args.summarize, errors="replace") as f:
            rows, units = parse_ncu_raw_csv(f.read())
        print("\n".join(summary_lines(plan, rows, units)))
        return 0

    import torch
    if not torch.cuda.is_available():
        print("kernel_profile.py needs a CUDA device (or --summarize)", file=sys.stderr)
        return 2
    import fused_fpn
    available = fused_fpn.available_backends("cuda")
    providers = [p for p in args.providers if p in ("eager", "compile") or p in available]
    regions = build_regions(args.levels, providers, args.dtype, args.layout, args.backward)
    with harness.recording_triton_choices() as chosen:
        for _, call in regions:          # autotune, compile and allocate outside the profiled ranges
            for _ in range(3):
                call()
    torch.cuda.synchronize()
    # the Triton configs this process runs with (each run autotunes anew: the plan run and the ncu run
    # print their own, and a Triton kernel's name does not say which config it is)
    choices = [f"triton autotune: {launch}: {config}" for launch, config in chosen.items()]
    if args.plan:
        plan = [{"label": label, "kernels": kernel_names(call)} for label, call in regions]
        with open(args.plan, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "layout": args.layout,
                       "regions": plan, "triton_configs": dict(chosen)}, f, indent=1)
        for region in plan:
            print(f"{region['label']:<28s} {len(region['kernels'])} kernels: "
                  + ", ".join(_base_name(k) for k in region["kernels"]))
        print("\n".join(choices))
        return 0
    print("\n".join(choices), file=sys.stderr)
    for label, call in regions:          # the profiled pass: one call per region, nothing else
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        call()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print("profiled regions: " + ", ".join(label for label, _ in regions), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
