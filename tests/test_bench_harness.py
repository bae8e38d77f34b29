"""Unit tests of the benchmark harness (benchmarks/harness.py) and a tiny smoke pass of the suite.

Nothing here asserts on a measured time: the logic (byte counts, roofline math, the parity gate,
memory accounting, result files) is checked on hand-computed values, and the smoke pass checks that
``pytest benchmarks --quick`` runs every case end to end and writes valid result files.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package at the repository root, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402

import fused_fpn  # noqa: E402


# ---------------------------------------------------------------------------------------------
# byte counts (DESIGN.md section 5) and roofline math
# ---------------------------------------------------------------------------------------------

def test_lateral_bytes_p2_matches_design_table():
    # P2 of ResNet-50-FPN, batch 2 at 800x1216, fp16: x 2x256x200x304, top 2x256x100x152, W 256x256, bias 256.
    b = harness.lateral_bytes(2, 256, 200, 304, 256, (100, 152), elem_bytes=2)
    x = y = 31_129_600          # 2 * 256 * 200 * 304 elements
    top = 7_782_400             # 2 * 256 * 100 * 152
    wb = 65_536 + 256
    assert b["fused"] == 2 * (x + wb + top + y) == 140_214_784          # DESIGN: 140 MB
    # conv: x, W, b in, lateral out; interpolate: top in, upsampled out; add: 2 in, 1 out
    assert b["eager"] == 2 * (x + wb + y + top + y + 3 * y) == 389_251_584  # DESIGN: 389 MB


def test_lateral_flops_match_design_table():
    """DESIGN.md section 5's GFLOP column (P2..P5: 15.9, 8.0, 4.0, 2.0) and the path's sum."""
    shapes = harness.GPU_SHAPES
    gflops = [harness.lateral_flops(shapes.batch, shapes.in_channels[i], *shapes.level_hw(i), shapes.out_channels) / 1e9
              for i in range(shapes.levels)]
    assert [round(g, 1) for g in gflops] == [15.9, 8.0, 4.0, 2.0]
    assert harness.lateral_flops(2, 256, 200, 304, 256) == 2 * 2 * 200 * 304 * 256 * 256
    assert harness.lateral_path_flops(shapes) == pytest.approx(sum(gflops) * 1e9)


def test_lateral_bytes_without_top_is_the_conv_alone():
    b = harness.lateral_bytes(2, 2048, 25, 38, 256, None, elem_bytes=2)
    expected = 2 * (2 * 2048 * 25 * 38 + 256 * 2048 + 256 + 2 * 256 * 25 * 38)
    assert b["fused"] == b["eager"] == expected
    no_bias = harness.lateral_bytes(2, 2048, 25, 38, 256, None, elem_bytes=2, bias=False)
    assert no_bias["fused"] == expected - 2 * 256


def test_lateral_path_bytes_sums_the_levels():
    s = harness.Shapes(batch=1, image_hw=(32, 64), in_channels=(4, 8), out_channels=2, strides=(4, 8))
    # level 0: x 1x4x8x16, top = level 1's map 1x2x4x8; level 1: x 1x8x4x8, no top. fp32.
    l0_fused = 4 * (4 * 128 + 2 * 4 + 2 + 2 * 32 + 2 * 128)
    l0_eager = 4 * (4 * 128 + 2 * 4 + 2 + 2 * 128 + 2 * 32 + 2 * 128 + 3 * 2 * 128)
    l1 = 4 * (8 * 32 + 2 * 8 + 2 + 2 * 32)
    assert harness.lateral_path_bytes(s, 4) == {"fused": l0_fused + l1, "eager": l0_eager + l1}


def test_roofline_and_copy_bandwidth():
    gbps, pct = harness.roofline(3_000_000_000, 1e-3, 3e12)
    assert gbps == pytest.approx(3000.0) and pct == pytest.approx(100.0)
    gbps, pct = harness.roofline(140_214_784, 70e-6, 3.0e12)
    assert gbps == pytest.approx(140_214_784 / 70e-6 / 1e9) and pct == pytest.approx(66.769, rel=1e-4)
    assert harness.copy_bandwidth(1 << 30, 0.5) == pytest.approx(4.0 * (1 << 30))  # read + write
    with pytest.raises(ValueError, match="seconds"):
        harness.roofline(1, 0.0, 1.0)
    with pytest.raises(ValueError, match="ceiling"):
        harness.roofline(1, 1.0, 0.0)
    with pytest.raises(ValueError, match="seconds"):
        harness.copy_bandwidth(1, -1.0)


def test_input_rotation_overflows_the_cache_within_the_cap():
    mib = 1 << 20
    assert harness.num_input_sets(8 * mib, 50 * mib, 4096 * mib, 32) == 13   # ceil(100 / 8)
    assert harness.num_input_sets(200 * mib, 50 * mib, 4096 * mib, 32) == 2  # never fewer than 2
    assert harness.num_input_sets(1 * mib, 50 * mib, 4096 * mib, 32) == 32   # max_sets
    assert harness.num_input_sets(600 * mib, 50 * mib, 1024 * mib, 32) == 1  # memory cap wins


def test_summarize_median_and_quartiles():
    t = harness.summarize([5.0, 1.0, 3.0, 2.0, 4.0], "m")
    assert (t.median_s, t.p25_s, t.p75_s, t.min_s, t.max_s, t.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert harness.summarize([7.0], "m").median_s == 7.0
    with pytest.raises(ValueError, match="no timing samples"):
        harness.summarize([], "m")


def test_cpu_peak_from_events_orders_by_time():
    events = [(30, -100), (10, 100), (20, 50), (40, 10), (25, -50)]
    # in time order: +100 (100), +50 (150), -50 (100), -100 (0), +10 (10)
    assert harness.cpu_peak_from_events(events) == 150
    assert harness.cpu_peak_from_events([]) == 0


def test_cpu_peak_memory_sees_a_temporary():
    n = 1 << 20  # 4 MiB of float32

    def fn(x):
        tmp = x * 2.0          # 4 MiB temporary
        out = tmp[: n // 4] + 1.0  # 1 MiB output, allocated while tmp is alive
        return out
    x = torch.ones(n)
    peak = harness.peak_memory(fn, (x,), "cpu")
    assert 5 * (1 << 20) <= peak < 6 * (1 << 20)


# ---------------------------------------------------------------------------------------------
# parity gate
# ---------------------------------------------------------------------------------------------

def _quick_cfg(tmp_path=None, **kw):
    cfg = harness.BenchConfig(device="cpu", quick=True, **kw)
    if tmp_path is not None:
        cfg.results_dir = str(tmp_path)
    return cfg


def test_check_parity_accepts_rounding_and_rejects_a_wrong_gather():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 8, 16, 16, generator=g)
    near = ref + 1e-6 * torch.randn(ref.shape, generator=g)
    assert harness.check_parity([near], [ref], torch.float32, "cpu").ok
    shifted = torch.roll(ref, 1, dims=-1)  # an off-by-one nearest index
    bad = harness.check_parity([shifted], [ref], torch.float32, "cpu")
    assert not bad.ok and bad.worst > 1.0 and "exceeds" in bad.message
    nan = ref.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert "NaN" in harness.check_parity([nan], [ref], torch.float32, "cpu").message
    assert "shape" in harness.check_parity([ref[:1]], [ref], torch.float32, "cpu").message
    assert "output tensors" in harness.check_parity([ref, ref], [ref], torch.float32, "cpu").message
    # half-precision tolerances: fp16 rounding of the same values passes, a 5% error does not
    rounded = (ref + 1e-4 * torch.randn(ref.shape, generator=g)).half()  # differs from ref.half() by <= 1 ulp
    assert not torch.equal(rounded, ref.half())
    assert harness.check_parity([rounded], [ref.half()], torch.float16, "cpu").ok
    assert not harness.check_parity([(ref * 1.05).half()], [ref.half()], torch.float16, "cpu").ok


def test_parity_gate_refuses_to_time_a_wrong_provider(monkeypatch, tmp_path):
    """A provider whose gather is off by one pixel is FAILED-PARITY: not timed, no speedup reported."""
    real = harness.LateralLevelWorkload.provider_fn

    def provider_fn(self, provider):
        fn = real(self, provider)
        if provider == "fused-torch":
            return lambda x, top: fn(x, torch.roll(top, 1, dims=-1))
        return fn
    monkeypatch.setattr(harness.LateralLevelWorkload, "provider_fn", provider_fn)
    run = harness.BenchRun(_quick_cfg(tmp_path))
    rec, once, args = run.run(harness.RowSpec("lateral_P3", "fp32", "nchw", "fused-torch"))
    assert rec.status == harness.FAILED_PARITY and "exceeds" in rec.message
    assert once is None and args is None
    assert rec.median_ms is None and rec.gbps is None and rec.peak_mem_bytes is None
    harness.finalize(run.records)
    assert rec.speedup_vs_eager is None
    run.close()


# ---------------------------------------------------------------------------------------------
# plan, speedups, result files
# ---------------------------------------------------------------------------------------------

def test_plan_on_cpu_lists_eager_compile_and_fused_backends():
    cfg = _quick_cfg()
    cfg.layouts = ["nchw"]
    rows = harness.plan(cfg, ("lateral_path",))
    provs = [r.provider for r in rows]
    expected_fused = [f"fused-{b}" for b in fused_fpn.available_backends("cpu") if b != "triton"]
    assert provs == ["eager", "compile"] + expected_fused
    assert "fused-triton" not in provs and "compile-max-autotune" not in provs
    cfg.providers = ["fused-*"]
    assert [r.provider for r in harness.plan(cfg, ("lateral_path",))] == ["eager"] + expected_fused
    cfg.layouts = None
    cfg.providers, cfg.cases = None, ["lateral_P*"]
    assert {r.case for r in harness.plan(cfg)} == set(harness.LEVEL_CASES)


def test_cpu_plan_covers_both_layouts():
    """The default CPU plan: every case in fp32 NCHW first, then the lateral path, each level and the
    FPN forward in fp32 channels_last (the CPU epilogue's other route); nothing in fp16/bf16."""
    rows = harness.plan(_quick_cfg())
    groups = list(dict.fromkeys((r.dtype, r.layout) for r in rows))
    assert groups == [("fp32", "nchw"), ("fp32", "channels_last")]
    assert {r.case for r in rows if r.layout == "nchw"} == set(harness.CASES)
    assert {r.case for r in rows if r.layout == "channels_last"} == \
        {"lateral_path", "fpn_forward", *harness.LEVEL_CASES}
    assert rows == sorted(rows, key=lambda r: r.priority)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="dtypes"):
        harness.BenchConfig(device="cpu", dtypes=["fp8"]).validate()
    with pytest.raises(ValueError, match="layouts"):
        harness.BenchConfig(device="cpu", layouts=["nhwc"]).validate()
    with pytest.raises(ValueError, match="device"):
        harness.BenchConfig(device="tpu").validate()
    with pytest.raises(ValueError, match=harness.BUDGET_ENV):
        harness.BenchConfig(device="cpu", budget_s=0).validate()


def _records():
    R = harness.Record
    return [
        R("lateral_path", "fp32", "nchw", "eager", "cpu", median_ms=10.0, p25_ms=9.0, p75_ms=11.0,
          peak_mem_bytes=1 << 20, bytes_min=1000, gbps=0.1, roofline_pct=1.0, timing_method="t"),
        R("lateral_path", "fp32", "nchw", "compile", "cpu", median_ms=5.0, p25_ms=4.0, p75_ms=6.0,
          peak_mem_bytes=1 << 20, bytes_min=1000, gbps=0.2, roofline_pct=2.0, timing_method="t"),
        R("lateral_path", "fp32", "nchw", "fused-cpu", "cpu", median_ms=2.0, p25_ms=1.5, p75_ms=2.5,
          peak_mem_bytes=1 << 19, bytes_min=1000, gbps=0.5, roofline_pct=5.0, timing_method="t"),
        R("lateral_path", "fp32", "nchw", "fused-torch", "cpu", status=harness.FAILED_PARITY, message="differs"),
        R("fpn_forward", "fp32", "nchw", "eager", "cpu", status=harness.NOT_RUN, message="budget"),
        R("fpn_forward", "fp32", "nchw", "fused-cpu", "cpu", median_ms=4.0, p25_ms=4.0, p75_ms=4.0,
          peak_mem_bytes=0, timing_method="t"),
    ]


def test_finalize_speedups_and_cpu_targets():
    recs = _records()
    harness.finalize(recs)
    eager, comp, fused, failed, _, fpn_fused = recs
    assert eager.speedup_vs_eager == pytest.approx(1.0) and eager.speedup_vs_compile == pytest.approx(0.5)
    assert fused.speedup_vs_eager == pytest.approx(5.0) and fused.speedup_vs_compile == pytest.approx(2.5)
    assert failed.speedup_vs_eager is None and failed.speedup_vs_compile is None
    assert fpn_fused.speedup_vs_eager is None  # its eager row did not run
    checks = {c["check"]: c for c in harness.target_checks(recs, "cpu")}
    assert checks["lateral_path fused-cpu vs eager"]["met"] is True
    assert checks["lateral_path fused-cpu vs eager"]["ratio"] == pytest.approx(5.0)
    assert checks["fpn_forward fused-cpu vs eager"]["met"] is False
    assert harness.target_checks(recs, "cuda") == []


def test_write_results_json_schema_png_and_markdown(tmp_path, monkeypatch):
    cfg = harness.BenchConfig(device="cpu", results_dir=str(tmp_path))  # the default shapes: targets apply
    cfg.command = "python -m pytest benchmarks"
    ceiling = harness.Ceiling(bytes_per_s=10e9, copy_bytes=1 << 20, method="test")
    report = harness.build_report(_records(), cfg, ceiling)
    paths = harness.write_results(report, cfg)
    slug = report["device"]["slug"]
    assert paths["json"] == str(tmp_path / f"{slug}_{report['date']}_partial.json")   # a NOT-RUN row: _partial
    data = json.loads(Path(paths["json"]).read_text())
    harness.validate_report(data)
    assert data["schema"] == harness.SCHEMA and data["command"] == cfg.command
    assert data["ceiling"]["bytes_per_s"] == 10e9
    assert data["config"]["memory_measure"] == harness.MEMORY_MEASURE["cpu"]
    by = {(r["case"], r["provider"]): r for r in data["results"]}
    assert by[("lateral_path", "fused-cpu")]["speedup_vs_eager"] == pytest.approx(5.0)
    assert by[("lateral_path", "fused-torch")]["status"] == harness.FAILED_PARITY
    assert by[("lateral_path", "fused-torch")]["median_ms"] is None
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(paths["png"]) > 10_000
    md = Path(paths["md"]).read_text()
    assert "| case | dtype |" in md and "FAILED-PARITY: differs" in md and cfg.command in md
    text = harness.format_table(data)
    assert "target lateral_path fused-cpu vs eager: 5.00x" in text and "NOT MET" in text
    quick = harness.build_report([r for r in _records() if r.status != harness.NOT_RUN], _quick_cfg(tmp_path), ceiling)
    assert quick["targets"] == []  # the targets are for the default CPU shapes, not --quick ones
    assert harness.result_paths(_quick_cfg(tmp_path), quick)["json"].endswith("_quick.json")
    filtered = _quick_cfg(tmp_path)
    filtered.cases = ["lateral_path"]   # a filtered run must not overwrite the full run's files
    assert harness.result_paths(filtered, quick)["json"].endswith("_quick_subset.json")
    graphed = dict(quick, device=dict(quick["device"], type="cuda", slug="nvidia-h200"))
    monkeypatch.setenv("FUSED_FPN_BENCH_CUDA_GRAPHS", "1")   # graph replays must not overwrite eager-call files
    graphed_name = "nvidia-h200_" + quick["date"] + "_cudagraphs_quick_subset.json"
    assert harness.result_paths(filtered, graphed)["json"].endswith(graphed_name)
    assert "_cudagraphs" not in harness.result_paths(filtered, quick)["json"]   # a CPU run times no graphs


def test_validate_report_rejects_a_speedup_on_a_failed_row():
    cfg = _quick_cfg()
    report = harness.build_report(_records(), cfg, None)
    bad = json.loads(json.dumps(report))
    bad["results"][3]["speedup_vs_eager"] = 3.0
    with pytest.raises(ValueError, match="FAILED-PARITY but reports a speedup"):
        harness.validate_report(bad)
    del bad["results"][0]["median_ms"]
    with pytest.raises(ValueError, match="lacks"):
        harness.validate_report(bad)


# ---------------------------------------------------------------------------------------------
# smoke pass: the suite itself, tiny shapes, on CPU
# ---------------------------------------------------------------------------------------------

def test_benchmark_suite_smoke_pass(tmp_path):
    """``pytest benchmarks --quick`` (eager + every fused backend; torch.compile is left to
    ``make bench``, its C++ compiles take minutes on 2 cores) runs every case and writes the files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_FPN_BENCH_")}
    env["FUSED_FPN_BENCH_DEVICE"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"  # on a shared, busy CPU, OpenMP barriers of 2+ threads stall for whole time slices
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--quick",
           "--bench-providers", "eager,fused-*", "--bench-results-dir", str(tmp_path), "--benchmark-disable-gc"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "fused_fpn benchmark results" in proc.stdout
    files = sorted(os.listdir(tmp_path))
    jsons = [f for f in files if f.endswith("_quick_subset.json")]   # --bench-providers: a subset
    assert len(jsons) == 1 and jsons[0].replace(".json", ".png") in files, files
    data = json.loads((tmp_path / jsons[0]).read_text())
    harness.validate_report(data)
    fused = [f"fused-{b}" for b in fused_fpn.available_backends("cpu") if b != "triton"]
    seen = {(r["case"], r["provider"]) for r in data["results"]}
    assert seen == {(c, p) for c in harness.CASES for p in ["eager"] + fused}
    for r in data["results"]:
        assert r["status"] == harness.OK, r
        assert r["median_ms"] > 0 and r["peak_mem_bytes"] is not None
        if r["case"].startswith("lateral") and r["case"] != "lateral_train":   # forward cases: a roofline
            assert r["bytes_min"] > 0 and r["roofline_pct"] > 0


def test_interleaved_timing_shuffles_provider_order_and_rotates_inputs():
    """Call order only (no time is asserted): every provider gets warm-up + the same number of timed
    calls, each round calls every provider once in the round's shuffled order (``round_orders``,
    repeatable), each provider follows more than one other provider (a fixed cyclic order gave each
    the same predecessor in most rounds), and consecutive calls never reuse one input set."""
    calls = []
    names = ("a", "b", "c", "d")
    fns = {name: (lambda i, name=name: calls.append((name, i))) for name in names}
    sets = [(0,), (1,)]
    reps = 12
    t = harness.TimingConfig(warmup=2, min_reps=reps, max_reps=reps, target_s=0.0, set_bytes_cap=0, max_sets=2)
    out = harness.time_interleaved(fns, sets, "cpu", t)
    assert set(out) == set(names) and all(v.n == reps for v in out.values())
    assert "interleaved" in out["a"].method
    timed = calls[len(names) * 2:]
    rounds = [[n for n, _ in timed[r * len(names):(r + 1) * len(names)]] for r in range(reps)]
    assert rounds == harness.round_orders(names, reps) == harness.round_orders(names, reps)
    assert all(sorted(order) == list(names) for order in rounds)
    before = {n: {timed[j - 1][0] for j in range(1, len(timed)) if timed[j][0] == n} for n in names}
    assert all(len(prev) >= 2 for prev in before.values()), before
    assert all(timed[j][1] != timed[j + 1][1] for j in range(len(timed) - 1))


def test_speedups_only_between_rows_timed_the_same_way():
    """In a graph-replay run a provider whose capture failed was timed as eager calls: no ratio is
    given between it and a replayed row, and the table names it; rows timed alike get their ratios."""
    replay = harness.GRAPH_REPLAY_METHOD + ", CUDA events, providers interleaved (shuffled), inputs rotated"
    eager_calls = "CUDA events per eager call from an idle GPU (graph capture failed), providers interleaved"

    def rec(provider, ms, method):
        r = harness.Record("lateral_P2", "fp16", "channels_last", provider, "cuda")
        r.median_ms, r.timing_method = ms, method
        return r

    rows = [rec("eager", 2.0, replay), rec("compile", 1.0, eager_calls), rec("fused-cuda", 0.5, replay)]
    harness.finalize(rows)
    eager, comp, fused = rows
    assert fused.speedup_vs_eager == 4.0 and fused.speedup_vs_compile is None
    assert comp.speedup_vs_eager is None and comp.speedup_vs_compile == 1.0
    assert comp.note == harness.MIXED_TIMING_NOTE and not fused.note and not eager.note
    comp.timing_method = replay   # timed alike: the ratios are back, the note gone
    harness.finalize(rows)
    assert fused.speedup_vs_compile == 2.0 and comp.speedup_vs_eager == 2.0 and not comp.note


def test_registered_providers_of_a_workload_are_measured_together(tmp_path):
    run = harness.BenchRun(_quick_cfg(tmp_path))
    specs = [harness.RowSpec("lateral_P5", "fp32", "nchw", p) for p in ("eager", "fused-torch")]
    run.register(specs)
    rec, once, args = run.run(specs[0])
    assert rec.status == harness.OK and "fused-torch" in run._pending  # measured in the same pass
    # eager's first call on the workload is the reference's (the parity call after it finds it warm)
    assert rec.first_call_s is not None and rec.first_call_s == run._reference_first_call_s
    assert "interleaved" in rec.timing_method and once is not None
    rec2, _, _ = run.run(specs[1])
    assert rec2.status == harness.OK and rec2.timing_method == rec.timing_method
    assert [r.provider for r in run.records] == ["eager", "fused-torch"]
    assert rec.bytes_min == rec2.bytes_min == harness.lateral_bytes(1, 128, 2, 2, 32, None, 4)["fused"]
    for r in (rec, rec2):
        assert r.tflops == pytest.approx(harness.lateral_flops(1, 128, 2, 2, 32) / (r.median_ms / 1e3) / 1e12)
    run.close()


def test_rows_the_session_did_not_hand_to_pytest_are_reported(monkeypatch, tmp_path):
    """A session that ends early (a timeout's SIGINT, ``-x``) loses no row it measured and names every
    row it did not: a row measured with its workload but not yet asked for keeps its timing; a row whose
    workload was interrupted while timing is NOT-RUN with its first call and parity; a registered row
    never reached is NOT-RUN; and the result files are marked _partial."""
    run = harness.BenchRun(_quick_cfg(tmp_path))
    p5, p4, p3 = ([harness.RowSpec(case, "fp32", "nchw", p) for p in ("eager", "fused-torch")]
                  for case in ("lateral_P5", "lateral_P4", "lateral_P3"))
    run.register(p5 + p4 + p3)
    run.run(p5[0])                                     # fused-torch of P5 measured, not yet asked for
    real = harness.time_interleaved

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(harness, "time_interleaved", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.run(p4[0])                                 # P4: parity done, interrupted while timing
    monkeypatch.setattr(harness, "time_interleaved", real)
    run.close()
    rows = {(r.case, r.provider): r for r in run.records}
    assert [(r.case, r.provider) for r in run.records] == [(s.case, s.provider) for s in p5 + p4 + p3]
    assert rows["lateral_P5", "fused-torch"].status == harness.OK and rows["lateral_P5", "fused-torch"].median_ms > 0
    for p in ("eager", "fused-torch"):
        r = rows["lateral_P4", p]
        assert (r.status, r.message) == (harness.NOT_RUN, harness.INTERRUPTED_BEFORE_TIMING)
        assert r.first_call_s is not None and r.parity_worst is not None and r.median_ms is None
        r = rows["lateral_P3", p]
        assert (r.status, r.message) == (harness.NOT_RUN, harness.NOT_REACHED) and r.first_call_s is None
    report = harness.build_report(run, run.cfg, None)
    harness.validate_report(report)
    assert rows["lateral_P5", "fused-torch"].speedup_vs_eager is not None
    assert os.path.basename(harness.result_paths(run.cfg, report)["json"]).endswith("_partial.json")
    run.close()                                        # idempotent: nothing added twice
    assert len(run.records) == 6
    done = harness.BenchRun(_quick_cfg(tmp_path))      # a complete run: no _partial
    done.register(p5)
    for spec in p5:
        done.run(spec)
    done.close()
    report = harness.build_report(done, done.cfg, None)
    assert [r.status for r in done.records] == [harness.OK, harness.OK]
    assert not harness.result_paths(done.cfg, report)["json"].endswith("_partial.json")


def test_rows_asked_for_out_of_order_are_reported_once(tmp_path):
    """A workload's rows asked for apart (pytest's --ff / --nf, a random-order plugin) are reported once
    each, as pytest got them; a session that asks for no row (--collect-only) reports none."""
    run = harness.BenchRun(_quick_cfg(tmp_path))
    p5 = [harness.RowSpec("lateral_P5", "fp32", "nchw", p) for p in ("eager", "fused-torch")]
    p4 = harness.RowSpec("lateral_P4", "fp32", "nchw", "eager")
    run.register(p5 + [p4])
    asked = [run.run(spec)[0] for spec in (p5[0], p4, p5[1])]   # P5's fused-torch after P4's row
    run.close()
    assert run.records == asked and all(r.status == harness.OK for r in asked)
    assert [(r.case, r.provider) for r in run.records] == [("lateral_P5", "eager"), ("lateral_P4", "eager"),
                                                           ("lateral_P5", "fused-torch")]
    collected = harness.BenchRun(_quick_cfg(tmp_path))
    collected.register(p5 + [p4])
    collected.close()
    assert collected.records == []


INTERRUPT_PLUGIN = """
import os

from benchmarks import harness
real, calls = harness.time_interleaved, []


def interrupt_timing(fns, *args, **kwargs):   # as a timeout's SIGINT while the Nth workload is timed
    if "eager" in fns:   # a workload's providers (not the copy ceiling's timing)
        calls.append(1)
        if len(calls) == int(os.environ["INTERRUPT_WORKLOAD"]):
            raise KeyboardInterrupt
    return real(fns, *args, **kwargs)


harness.time_interleaved = interrupt_timing
"""


@pytest.mark.parametrize("interrupted", [1, 2])
def test_an_interrupted_benchmark_session_still_writes_every_row(tmp_path, interrupted):
    """``pytest benchmarks`` interrupted while timing its first or second workload (SIGINT, as
    gpu_run.sh's timeout sends) still prints the table and writes _partial files: the rows it timed,
    the interrupted workload's NOT-RUN with their first calls, and the rest NOT-RUN."""
    (tmp_path / "interrupt_plugin.py").write_text(INTERRUPT_PLUGIN)
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_FPN_BENCH_")}
    env.update(FUSED_FPN_BENCH_DEVICE="cpu", OMP_NUM_THREADS="1", INTERRUPT_WORKLOAD=str(interrupted),
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)] + [env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "-p", "interrupt_plugin",
           "--quick", "--bench-cases", "lateral_P5,lateral_P4,lateral_P3", "--bench-dtypes", "fp32",
           "--bench-layouts", "nchw", "--bench-providers", "eager,fused-torch", "--bench-results-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "KeyboardInterrupt" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "fused_fpn benchmark results" in proc.stdout
    jsons = [f for f in os.listdir(out) if f.endswith(".json")]
    assert len(jsons) == 1 and jsons[0].endswith("_quick_subset_partial.json"), jsons
    data = json.loads((out / jsons[0]).read_text())
    harness.validate_report(data)
    got = [(r["case"], r["provider"], r["status"], r["message"]) for r in data["results"]]
    cases = list(dict.fromkeys(case for case, *_ in got))   # in the order they ran
    assert sorted(cases) == ["lateral_P3", "lateral_P4", "lateral_P5"]
    outcome = [(harness.OK, "")] * (interrupted - 1) + [(harness.NOT_RUN, harness.INTERRUPTED_BEFORE_TIMING)] + \
        [(harness.NOT_RUN, harness.NOT_REACHED)] * (3 - interrupted)
    assert got == [(case, p, *result) for case, result in zip(cases, outcome) for p in ("eager", "fused-torch")]
    ran = data["results"][:2 * interrupted]   # the interrupted workload's parity (first) calls ran
    assert all(r["first_call_s"] is not None and r["parity_worst"] is not None for r in ran)


def _eager_and_fused_torch_rows(monkeypatch, tmp_path, wrap):
    """(run, eager record, fused-torch record) of lateral_P5 fp32 nchw in a quick run, with fused-torch's
    provider function ``fn`` replaced by ``wrap(fn)`` (standing in for what a GPU provider does on its
    calls: compile on the first, report the autotuner's choice)."""
    real = harness.LateralLevelWorkload.provider_fn

    def provider_fn(self, provider):
        fn = real(self, provider)
        return wrap(fn) if provider == "fused-torch" else fn
    monkeypatch.setattr(harness.LateralLevelWorkload, "provider_fn", provider_fn)
    run = harness.BenchRun(_quick_cfg(tmp_path))
    specs = [harness.RowSpec("lateral_P5", "fp32", "nchw", p) for p in ("eager", "fused-torch")]
    run.register(specs)
    return run, run.run(specs[0])[0], run.run(specs[1])[0]


def test_rows_record_their_first_call_and_the_notes_list_slow_ones(monkeypatch, tmp_path):
    """Each row keeps the seconds of its provider's first call (the parity call, synchronized: where a
    new shape compiles and autotunes), and the table's notes list, per workload where some provider's
    first call took at least a second, every provider's first-call seconds."""
    first = []

    def slow_first_call(fn):
        def call(*args):   # as a first call that compiles would be
            if not first:
                first.append(True)
                time.sleep(1.2)
            return fn(*args)
        return call
    run, eager, fused = _eager_and_fused_torch_rows(monkeypatch, tmp_path, slow_first_call)
    assert fused.status == eager.status == harness.OK
    assert fused.first_call_s >= 1.2 and 0 < eager.first_call_s < fused.first_call_s
    report = json.loads(json.dumps(harness.build_report(run, run.cfg, None)))
    assert [r["first_call_s"] for r in report["results"]] == [eager.first_call_s, fused.first_call_s]
    notes = [line for line in harness.format_table(report, markdown=True).splitlines() if "first call" in line]
    assert notes == [f"- first call (compiles, autotunes), s: lateral_P5 fp32 nchw: eager {eager.first_call_s:.1f}, "
                     f"fused-torch {fused.first_call_s:.1f}"]
    run.close()
    fast = [dict(case="lateral_P2", dtype="fp16", layout="nchw", provider="eager", first_call_s=0.2),
            dict(case="lateral_P2", dtype="fp16", layout="nchw", provider="compile", first_call_s=0.9),
            dict(case="lateral_P3", dtype="fp16", layout="nchw", provider="eager", first_call_s=None)]
    assert harness.first_call_notes(fast) == []
    assert harness.first_call_notes(fast, min_s=0.5) == [
        "first call (compiles, autotunes), s: lateral_P2 fp16 nchw: eager 0.2, compile 0.9"]


def test_rows_record_the_triton_configs_their_launches_chose(monkeypatch, tmp_path):
    """Each row keeps what the Triton launcher reported choosing during the row's calls (on a GPU:
    ``lateral_launch._launch_autotuned``; here a provider reports a choice itself, as that launcher
    does), and the table's notes list each (launch, config) with the rows that ran it."""
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L

    class Tuner:   # what the launcher reads of an autotuner: its name
        fused_fpn_name = "fwd"
    config = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "PERSISTENT": True,
              "num_warps": 8, "num_stages": 3, "maxnreg": None}
    key = (K.tune_key(126, True, True, True), 256, 2048, torch.float16)

    def reporting(fn):
        def call(*args):
            L._note_choice(Tuner(), key, config)
            return fn(*args)
        return call
    run, eager, fused = _eager_and_fused_torch_rows(monkeypatch, tmp_path, reporting)
    launch = "fwd Cout=256 Cin=2048 M<=128 x=cl out=cl float16"
    described = "BLOCK_M=128 BLOCK_N=256 BLOCK_K=64 GROUP_M=8 PERSISTENT=True num_warps=8 num_stages=3"
    assert fused.status == harness.OK and fused.triton_configs == {launch: described}
    assert eager.triton_configs is None
    assert not L._RECORDERS
    report = harness.build_report(run, run.cfg, None)
    report = json.loads(json.dumps(report))
    assert report["results"][1]["triton_configs"] == {launch: described}
    text = harness.format_table(report, markdown=True)
    assert f"- triton autotune: {launch}: {described} (lateral_P5/nchw/fused-torch)" in text.splitlines()
    run.close()


def test_gpu_plan_logic(monkeypatch):
    """The GPU plan, with the backends a GPU machine lists faked (no GPU here): fp16 first, every case
    in fp16 (both layouts), lateral path + FPN forward in bf16/fp32; max-autotune only on the fp16
    NCHW lateral path by default; every available fused backend in every row group."""
    monkeypatch.setattr(harness, "fused_backends", lambda device: ["cuda", "torch", "triton"])
    monkeypatch.setattr(harness, "backend_supports", lambda name, device, dtype: None)
    cfg = harness.BenchConfig(device="cuda")  # not validated: there is no GPU here
    rows = harness.plan(cfg)
    groups = list(dict.fromkeys((r.dtype, r.layout) for r in rows))
    assert groups[:2] == [("fp16", "nchw"), ("fp16", "channels_last")]
    assert set(groups) == {(d, lay) for d in ("fp16", "bf16", "fp32") for lay in harness.LAYOUTS}
    assert {r.case for r in rows if r.dtype == "fp16"} == set(harness.CASES)
    assert {r.case for r in rows if r.dtype != "fp16"} == {"lateral_path", "fpn_forward"}
    mat = [r for r in rows if r.provider == "compile-max-autotune"]
    assert [(r.case, r.dtype, r.layout) for r in mat] == [("lateral_path", "fp16", "nchw")]
    path = [r.provider for r in rows if r.key == ("lateral_path", "fp16", "nchw")]
    assert path == ["eager", "compile", "compile-max-autotune", "fused-cuda", "fused-torch", "fused-triton"]
    assert rows == sorted(rows, key=lambda r: r.priority)
    cfg.max_autotune = "lateral"
    assert {r.case for r in harness.plan(cfg) if r.provider == "compile-max-autotune"} == \
        {"lateral_path", *harness.LEVEL_CASES}
    cfg.max_autotune = "0"
    assert not [r for r in harness.plan(cfg) if r.provider == "compile-max-autotune"]
    cfg.dtypes, cfg.layouts = ["bf16"], ["nchw"]
    assert {(r.case, r.dtype, r.layout) for r in harness.plan(cfg)} == {(c, "bf16", "nchw") for c in harness.CASES}


def test_busy_cpu_warning_in_the_table():
    run = harness.BenchRun(_quick_cfg())
    run.records = _records()
    run.load_start = 100.0 * (os.cpu_count() or 1)
    text = harness.format_table(harness.build_report(run, run.cfg, None))
    assert "1-min load average" in text and "WARNING: other processes were using the CPU" in text
    run.load_start = 0.0
    text = harness.format_table(harness.build_report(run, run.cfg, None))
    assert "1-min load average 0.00 at the start" in text and "WARNING" not in text


def test_launch_overhead_diagnostic_runs_on_cpu(tmp_path):
    """benchmarks/launch_overhead.py (the host-cost-per-layer diagnostic gpu_run.sh runs) on CPU
    tensors: every row runs, and the layers it lists for the cpu backend are there."""
    from benchmarks import launch_overhead
    out = tmp_path / "overhead.json"
    assert launch_overhead.main(["--device", "cpu", "--calls", "20", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert not [r for r in rows.values() if "error" in r]
    expected = {"eager: conv2d + interpolate + add", "eager: forward + backward",
                "FPN torchvision: forward", "FPN torchvision: forward + backward"}
    if "cpu" in fused_fpn.available_backends("cpu"):
        expected |= {"cpu: registered op", "cpu: fused_fpn.lateral", "cpu: forward + backward",
                     "FPN cpu: forward", "FPN cpu: forward + backward"}
    assert expected <= set(rows), sorted(rows)
    assert all(r["us_per_call"] > 0 for r in rows.values())
    assert not any(name.startswith("triton") for name in rows), "the interpreter is not a launch path"


@pytest.mark.skipif("triton" not in fused_fpn.available_backends("cpu"), reason="Triton interpreter not active")
def test_launch_overhead_times_the_triton_launchers_with_the_jit_launch_stubbed(tmp_path):
    """``launch_overhead.py --device cpu --stub-triton-launch`` (in its own process: it patches the
    launcher for good) adds the Triton launchers' rows, fast path and Autotuner.run, forward and dW, and
    the layers above them (registered op, public function, autograd, forward + backward), each without error."""
    out = tmp_path / "overhead.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "benchmarks/launch_overhead.py", "--device", "cpu", "--calls", "20",
           "--stub-triton-launch", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    stubbed = {f"triton launcher, JIT stubbed: {what}{how}" for what in ("forward", "dW")
               for how in ("", ", Autotuner.run")}
    stubbed |= {f"triton, JIT stubbed: {what}" for what in ("registered op", "fused_fpn.lateral", "..., requires_grad",
                                                            "forward + backward")}
    stubbed |= {f"triton, JIT stubbed: {what}{how}" for what in ("fused_fpn.lateral", "forward + backward")
                for how in (", binary launch", ", experimental switch, JIT launch")}
    assert stubbed <= set(rows), sorted(rows)
    assert all(rows[name]["us_per_call"] > 0 for name in stubbed)
    off = subprocess.run(cmd[:-2], cwd=ROOT, env=dict(env, TRITON_INTERPRET="0"), capture_output=True, text=True,
                         timeout=600)
    assert off.returncode == 2 and "needs --device cpu and TRITON_INTERPRET=1" in off.stderr, off.stderr



def test_launch_overhead_times_the_launchers_with_a_stand_in_sm90_jit(tmp_path):
    """``launch_overhead.py --device cpu --stand-in-sm90`` (without TRITON_INTERPRET: triton's JIT
    compiles for sm_90, a stand-in driver launches nothing) times the forward and backward launchers
    through the JIT and through their kept binaries, each without error; refused under the interpreter."""
    out = tmp_path / "overhead.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "benchmarks/launch_overhead.py", "--device", "cpu", "--calls", "20", "--stand-in-sm90",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {f"triton launcher, stand-in sm_90 JIT: {what}{how}"
                         for how in ("", ", binary launch", ", experimental switch, JIT launch")
                         for what in ("forward", "backward (dx, dW, db + dtop)")}
    assert all(r["us_per_call"] > 0 for r in rows.values())
    on = subprocess.run(cmd[:-2], cwd=ROOT, env=dict(env, TRITON_INTERPRET="1"), capture_output=True, text=True,
                        timeout=600)
    assert on.returncode == 2 and "needs --device cpu without TRITON_INTERPRET" in on.stderr, on.stderr


def test_launch_overhead_sets_the_experimental_switch_for_binary_rows_only(monkeypatch):
    """Rows ending in ", binary launch" are timed with FUSED_FPN_TRITON_EXPERIMENTAL=1, rows ending in
    ", experimental switch, JIT launch" with it and lateral_launch.BINARY_LAUNCH off (both restored
    after, also on error); other rows as the environment has it."""
    from benchmarks import launch_overhead
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    monkeypatch.setenv(K.EXPERIMENTAL_ENV, "0")
    with launch_overhead.experimental_switch("triton: fused_fpn.lateral"):
        assert not K.experimental_enabled() and L.BINARY_LAUNCH
    with launch_overhead.experimental_switch("triton: fused_fpn.lateral, binary launch"):
        assert K.experimental_enabled() and L.BINARY_LAUNCH
    with launch_overhead.experimental_switch("triton: fused_fpn.lateral, experimental switch, JIT launch"):
        assert K.experimental_enabled() and not L.BINARY_LAUNCH
    assert os.environ[K.EXPERIMENTAL_ENV] == "0" and L.BINARY_LAUNCH
    monkeypatch.delenv(K.EXPERIMENTAL_ENV)
    with pytest.raises(ZeroDivisionError), launch_overhead.experimental_switch("x, binary launch"):
        1 / 0
    assert K.EXPERIMENTAL_ENV not in os.environ


def test_experimental_triton_provider_is_opt_in_and_scoped_to_its_calls(monkeypatch):
    """fused-triton-x is never a default provider (only when --bench-providers names it), and its calls
    run with FUSED_FPN_TRITON_EXPERIMENTAL=1, the previous value restored after each (also on error)."""
    from fused_fpn.kernels import lateral_kernels as K
    assert not harness.wants_experimental(None) and not harness.wants_experimental(["eager", "fused-cuda"])
    assert harness.wants_experimental(["eager", "fused-triton-x"])
    assert not harness.wants_experimental(["eager", "fused-*"])   # a wildcard does not bring it in
    monkeypatch.setenv(K.EXPERIMENTAL_ENV, "0")
    seen = []
    wrapped = harness.with_experimental_configs(lambda a, b: seen.append((K.experimental_enabled(), a + b)) or a + b)
    assert wrapped(2, 3) == 5 and seen == [(True, 5)]
    assert os.environ[K.EXPERIMENTAL_ENV] == "0"

    def boom():
        raise RuntimeError("kernel failed")
    monkeypatch.delenv(K.EXPERIMENTAL_ENV)
    with pytest.raises(RuntimeError):
        harness.with_experimental_configs(boom)()
    assert K.EXPERIMENTAL_ENV not in os.environ


def test_backward_breakdown_bytes():
    """benchmarks/backward_breakdown.py's byte floors, by hand for one level (2 bytes per element)."""
    from benchmarks import backward_breakdown as bb
    n, cin, h, w, cout, top = 2, 3, 4, 5, 7, (2, 3)
    dy, x, wgt, t = n * cout * h * w, n * cin * h * w, cout * cin, n * cout * 2 * 3
    got = bb.piece_bytes(n, cin, h, w, cout, top, 2)
    assert got == {"dx": 2 * (dy + wgt + x), "dW": 2 * (dy + x + wgt), "db": 2 * (dy + cout),
                   "dtop": 2 * (dy + t), "db+dtop": 2 * (dy + cout + t),
                   "single": 2 * (dy + x + wgt + x + wgt + cout + t)}
    no_top = bb.piece_bytes(n, cin, h, w, cout, None, 2)
    assert no_top["dtop"] == 0 and no_top["db+dtop"] == no_top["db"]
    assert bb.piece_floor("dx+dW+db", got) == got["dx"] + got["dW"] + got["db"]
    assert bb.piece_floor("all four", got) == got["dx"] + got["dW"] + got["db+dtop"]


@pytest.mark.parametrize("top_hw", [(3, 4), None], ids=["top", "no_top"])
def test_backward_breakdown_pieces_compute_the_gradients(top_hw):
    """Every piece backward_breakdown.py times computes what its name says (checked on CPU tensors against
    the float64 gradients: the "cuda" pieces are the C++ ops, which run on CPU too, the "triton" ones the
    interpreter), so the GPU timings are of the right work."""
    from benchmarks import backward_breakdown as bb
    from fused_fpn.reference import lateral_backward_reference
    backends = [b for b in ("cuda", "triton") if b == "cuda" and fused_fpn.extension_loaded()
                or b == "triton" and "triton" in fused_fpn.available_backends("cpu")]
    g = torch.Generator().manual_seed(0)
    n, cin, cout, h, w = 2, 6, 5, 7, 9
    x = torch.randn((n, cin, h, w), generator=g)
    dy = torch.randn((n, cout, h, w), generator=g)
    weight = torch.randn((cout, cin), generator=g)
    dx, dw, db, dtop = lateral_backward_reference(dy.double(), x.double(), weight.double(), top_hw or (0, 0),
                                                  (True, True, True, top_hw is not None))
    want = {"dx": [dx], "dW": [dw], "db+dtop": [db] + ([dtop] if top_hw else []),
            "dx+dW+db": [dx, dw.view(cout, cin, 1, 1), db], "dtop": [dtop],
            "all four": [dx, dw, db] + ([dtop] if top_hw else [])}
    pieces = bb.level_pieces(backends, cout, top_hw, weight)
    assert {p for p, _, _ in pieces} == {"eager", *backends}
    for provider, piece, fn in pieces:
        out = fn(x, dy)
        got = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if t is not None and t.numel() > 0]
        assert len(got) == len(want[piece]), (provider, piece, [tuple(t.shape) for t in got])
        for a, e in zip(got, want[piece]):
            torch.testing.assert_close(a.double(), e, atol=1e-4, rtol=1e-4, msg=lambda m: f"{provider} {piece}: {m}")


def test_backward_breakdown_needs_a_gpu(capsys):
    """Without a GPU the diagnostic says so and exits 2."""
    from benchmarks import backward_breakdown
    if torch.cuda.is_available():
        pytest.skip("the no-GPU branch only")
    assert backward_breakdown.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert harness.parse_levels("p5, P2") == [0, 3]
    with pytest.raises(SystemExit):   # argparse: a level that does not exist
        backward_breakdown.main(["--levels", "P6"])
    assert "levels are P2, P3, P4, P5" in capsys.readouterr().err


def test_host_profile_diagnostic_needs_a_gpu(capsys):
    """benchmarks/host_profile.py imports (its helpers come from launch_overhead.py) and, without a
    GPU, says so and exits 2 instead of failing somewhere inside."""
    from benchmarks import host_profile
    if torch.cuda.is_available():
        pytest.skip("the no-GPU branch only")
    assert host_profile.main(["--calls", "5"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
