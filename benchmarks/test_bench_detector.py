"""A real detector end to end: torchvision fasterrcnn_resnet50_fpn (random weights, eval) as it is,
with its FPN compiled, and with its FPN swapped for fused_fpn (fused_fpn.convert when it exists)."""
BENCH_CASES = ("detector",)


def test_detector(bench_row, bench_spec):
    rec = bench_row(bench_spec)
    assert rec.median_ms is not None and rec.median_ms > 0
