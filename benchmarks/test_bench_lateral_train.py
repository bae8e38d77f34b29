"""The lateral path trained: forward + backward of the 4 levels (grads of the inputs and of the 1x1
weights and biases), torchvision's way vs torch.compile of it vs each fused backend (whose backward
is its fused db + dtop pass plus dx and dW)."""
BENCH_CASES = ("lateral_train",)


def test_lateral_train(bench_row, bench_spec):
    rec = bench_row(bench_spec)
    assert rec.median_ms is not None and rec.median_ms > 0
