"""The whole FPN: forward (no grad) and a training step (forward + backward), torchvision's
FeaturePyramidNetwork vs torch.compile of it vs fused_fpn.FPN with its state_dict, per backend."""
BENCH_CASES = ("fpn_forward", "fpn_train")


def test_fpn(bench_row, bench_spec):
    rec = bench_row(bench_spec)
    assert rec.median_ms is not None and rec.median_ms > 0
