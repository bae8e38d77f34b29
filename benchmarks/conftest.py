"""pytest glue of the benchmark suite: options, parametrization, the per-row fixture, the final table.

Options (each also settable through the environment variable named here, read in benchmarks/harness.py
or, for FUSED_FPN_BENCH_THREADS, below):
  --quick                  tiny shapes and 3 timed calls per row (smoke runs)   FUSED_FPN_BENCH_QUICK=1
  --bench-device cpu|cuda  default: cuda when available                         FUSED_FPN_BENCH_DEVICE
  --bench-results-dir DIR  default: benchmarks/results                          FUSED_FPN_BENCH_RESULTS_DIR
  --bench-providers P,..   fnmatch patterns, e.g. "eager,fused-*" (eager always runs)  FUSED_FPN_BENCH_PROVIDERS
  --bench-cases C,..       fnmatch patterns over case names, e.g. "lateral_*"  FUSED_FPN_BENCH_CASES
  --bench-dtypes D,..      fp16,bf16,fp32 (then every case in every dtype x layout)  FUSED_FPN_BENCH_DTYPES
  --bench-layouts L,..     nchw,channels_last                                   FUSED_FPN_BENCH_LAYOUTS
  --bench-budget-s S       rows not started after S seconds are NOT-RUN         FUSED_FPN_BENCH_BUDGET_S
  --bench-max-autotune M   GPU torch.compile(mode="max-autotune"): path | lateral | 0   FUSED_FPN_BENCH_MAX_AUTOTUNE
  --bench-threads N        CPU: torch.set_num_threads(N) (the device slug says how many) FUSED_FPN_BENCH_THREADS

Each test is one row (case x dtype x layout x provider). A provider whose output differs from eager
fails its test as FAILED-PARITY and gets no timing; a provider that raises fails as ERROR. The table,
JSON, PNG and markdown are written at the end of the session (pytest_terminal_summary), also when it
ends early (interrupted, -x): the rows it did not time are then NOT-RUN (``BenchRun.close``).
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict

import pytest
import torch

from benchmarks import harness

_KEY = "_fused_fpn_bench_run"


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def pytest_addoption(parser):
    g = parser.getgroup("fused_fpn benchmarks")
    g.addoption("--quick", action="store_true", default=None, help="tiny shapes, 3 timed calls per row (smoke run)")
    g.addoption("--bench-device", choices=["cpu", "cuda"], default=None, help="device to benchmark")
    g.addoption("--bench-results-dir", default=None, help="where the JSON/PNG/MD results go")
    g.addoption("--bench-providers", default=None, help="comma list of fnmatch patterns over provider names")
    g.addoption("--bench-cases", default=None, help="comma list of fnmatch patterns over case names")
    g.addoption("--bench-dtypes", default=None, help="comma list among fp16,bf16,fp32")
    g.addoption("--bench-layouts", default=None, help="comma list among nchw,channels_last")
    g.addoption("--bench-budget-s", type=float, default=None, help="rows not started after this many s: NOT-RUN")
    g.addoption("--bench-threads", type=int, default=None,
                help="CPU: torch.set_num_threads(N) for the run (default: torch's own choice)")
    g.addoption("--bench-max-autotune", choices=["0", "path", "lateral"], default=None,
                help="GPU: which cases also run torch.compile(mode='max-autotune')")


def pytest_configure(config):
    opt = config.getoption
    try:
        cfg = harness.BenchConfig.from_env(
            quick=True if opt("--quick") else None, device=opt("--bench-device"),
            results_dir=opt("--bench-results-dir"), providers=_csv(opt("--bench-providers")),
            cases=_csv(opt("--bench-cases")), dtypes=_csv(opt("--bench-dtypes")),
            layouts=_csv(opt("--bench-layouts")), budget_s=opt("--bench-budget-s"),
            max_autotune=opt("--bench-max-autotune"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from exc
    threads = opt("--bench-threads")
    if threads is None and os.environ.get("FUSED_FPN_BENCH_THREADS"):
        try:
            threads = int(os.environ["FUSED_FPN_BENCH_THREADS"])
        except ValueError as exc:
            raise pytest.UsageError(f"FUSED_FPN_BENCH_THREADS must be an integer, got "
                                    f"{os.environ['FUSED_FPN_BENCH_THREADS']!r}") from exc
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"--bench-threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    env = [f"{k}={v}" for k, v in sorted(os.environ.items())
           if k.startswith("FUSED_FPN_BENCH_") or k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")]
    cfg.command = " ".join(env + ["python -m pytest"] + list(config.invocation_params.args))
    # a FAILED-PARITY / ERROR row fails before it reaches pytest-benchmark: that is by design
    config.addinivalue_line("filterwarnings", "ignore:Benchmark fixture was not used")
    setattr(config, _KEY, harness.BenchRun(cfg))


def pytest_generate_tests(metafunc):
    if "bench_spec" not in metafunc.fixturenames:
        return
    run = getattr(metafunc.config, _KEY)
    cases = getattr(metafunc.module, "BENCH_CASES")
    specs = harness.plan(run.cfg, cases)
    metafunc.parametrize("bench_spec", specs, ids=[s.id for s in specs])


def pytest_collection_modifyitems(config, items):
    """Run rows in priority order across files (what runs first survives a time budget), keeping the
    providers of one workload together (the workload is built once for them). A test function whose
    cases are all filtered out (--bench-cases ...) is deselected rather than skipped."""
    empty = [item for item in items if "bench_spec" in getattr(getattr(item, "callspec", None), "params", {})
             and not isinstance(item.callspec.params["bench_spec"], harness.RowSpec)]
    if empty:
        config.hook.pytest_deselected(items=empty)
        items[:] = [item for item in items if item not in empty]

    def prio(item):
        spec = getattr(getattr(item, "callspec", None), "params", {}).get("bench_spec")
        return (1,) + spec.priority if isinstance(spec, harness.RowSpec) else (0,)
    items.sort(key=prio)


def pytest_collection_finish(session):
    """Tell the run which providers of each workload were selected: they are measured together."""
    run = getattr(session.config, _KEY, None)
    if run is not None:
        run.register([item.callspec.params["bench_spec"] for item in session.items
                      if isinstance(getattr(getattr(item, "callspec", None), "params", {}).get("bench_spec"),
                                    harness.RowSpec)])


@pytest.fixture
def bench_run(request) -> harness.BenchRun:
    return getattr(request.config, _KEY)


@pytest.fixture
def bench_row(bench_run, benchmark):
    """bench_row(spec): measure one row, hand one call to pytest-benchmark (a single round; the
    row's own median, spread, memory and bandwidth go into benchmark.extra_info)."""
    def run_row(spec: harness.RowSpec) -> harness.Record:
        rec, once, args = bench_run.run(spec)
        if rec.status == harness.NOT_RUN:
            pytest.skip(f"{harness.NOT_RUN}: {rec.message}")
        if rec.status == harness.FAILED_PARITY:
            pytest.fail(f"{harness.FAILED_PARITY}: {spec.provider} differs from eager on {spec.id}: {rec.message}",
                        pytrace=False)
        if rec.status != harness.OK:
            pytest.fail(f"{rec.status}: {spec.provider} on {spec.id}: {rec.message}", pytrace=False)
        benchmark.group = f"{spec.case} {spec.dtype} {spec.layout}"
        benchmark.extra_info.update({k: v for k, v in asdict(rec).items() if v is not None and v != ""})
        benchmark.pedantic(once, args=args, rounds=1, iterations=1, warmup_rounds=0)
        return rec
    return run_row


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    run = getattr(config, _KEY, None)
    if run is None:
        return
    run.close()   # rows the session did not hand to pytest (interrupted, -x) join the records here
    if not run.records:
        return
    report = harness.build_report(run, run.cfg, run._ceiling)
    tr = terminalreporter
    tr.section("fused_fpn benchmark results")
    tr.write_line("(pytest-benchmark's tables above time one call per row; the medians, spreads and ratios are here)")
    for line in harness.format_table(report).splitlines():
        tr.write_line(line)
    try:
        paths = harness.write_results(report, run.cfg)
    except Exception as exc:  # noqa: BLE001 - the table is printed; say why the files are not
        tr.write_line(f"could not write the result files: {type(exc).__name__}: {exc}", red=True)
        config._fused_fpn_bench_write_error = exc
        return
    for kind, path in paths.items():
        tr.write_line(f"wrote {kind.upper()}: {path}")
    sys.stdout.flush()


def pytest_sessionfinish(session, exitstatus):
    """A failure to write the result files fails the run (the table alone is not the product)."""
    if getattr(session.config, "_fused_fpn_bench_write_error", None) is not None and exitstatus == 0:
        session.exitstatus = 1
