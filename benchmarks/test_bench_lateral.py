"""The fused lateral op: per level (P2..P5) and the whole lateral path (4 levels, top-down),
every provider side by side, with bytes moved, GB/s, % of the copy ceiling and TFLOP/s."""
from benchmarks import harness

BENCH_CASES = ("lateral_path",) + harness.LEVEL_CASES


def test_lateral(bench_row, bench_spec):
    rec = bench_row(bench_spec)
    assert rec.gbps is not None and rec.gbps > 0 and rec.roofline_pct is not None
    assert rec.tflops is not None and rec.tflops > 0
