"""Concurrent calls of ``fused_fpn.lateral`` from several Python threads give the single-threaded results.

4 threads x 20 calls (forward and backward), each thread walking a list of mixed shapes, dtypes and
layouts in its own order, all released at once by a barrier. The threaded run comes FIRST, on shapes
no other test uses, so that per-shape state (Triton's autotuner and kernel caches, the extension's
lazy paths, the caching allocator) is created while the threads race for it; the single-threaded
results are computed afterwards and compared bit for bit (forward, and the gradients the backend
computes itself: see ``_bitwise_grads``).

The Triton backend on CPU tensors (TRITON_INTERPRET=1) is too slow for this matrix; it has its own small
test below. The interpreter patches ``triton.language`` module-wide for each launch, so
kernels/lateral_launch.py serializes interpreted launches with a lock (without it two threads break each
other: "Did you forget to add @triton.jit ?"); on a GPU the compiled Triton backend runs the full matrix.
The same lock covers compiled launches, because triton's Autotuner is not thread-safe while it tunes a
new shape; ``test_autotuning_is_not_broken_by_a_launch_from_another_thread`` pins that down here, on
the launcher's GPU code path with an interpreted kernel.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

import fused_fpn
from fpn_testing import DEVICES, backend_supports

THREADS, CALLS = 4, 20
JOIN_TIMEOUT_S = 300
GRAD_NAMES = ("x", "weight", "bias", "top")

# (N, Cin, Cout, (H, W), (Ht, Wt) or None, bias?, layout): odd sizes used nowhere else
SHAPES = [
    (1, 3, 5, (7, 5), (4, 3), True, "nchw"),
    (2, 19, 11, (9, 6), (5, 3), True, "channels_last"),
    (1, 37, 23, (13, 11), (19, 17), False, "nchw"),          # nearest down-sampling
    (3, 10, 31, (6, 10), None, True, "channels_last"),
    (2, 27, 9, (11, 15), (6, 8), False, "noncontig"),
    (1, 45, 29, (17, 19), (9, 10), True, "channels_last"),
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def backend_params():
    params = []
    for device in DEVICES:
        for name in fused_fpn.available_backends(device):
            if device == "cpu" and name == "triton":
                continue   # too slow here: test_triton_interpreter_threads below
            params.append(pytest.param(device, name, id=f"{device}-{name}"))
    return params


pytestmark = pytest.mark.usefixtures("no_tf32")   # IEEE fp32 on GPUs (conftest)


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":
        return t.transpose(2, 3).contiguous().transpose(2, 3)   # strides (C*H*W, H*W, 1, H)
    return t


def _cases(device, backend):
    """(x, weight, bias, top, dy) per shape, each in a dtype the backend takes (cycled)."""
    dtypes = [d for d in DTYPES if backend_supports(backend, device, d) is None]
    cases = []
    for i, (n, cin, cout, hw, top_hw, with_bias, layout) in enumerate(SHAPES):
        dtype = dtypes[i % len(dtypes)]
        g = torch.Generator().manual_seed(100 + i)
        x = _layout(torch.randn((n, cin, *hw), generator=g), layout).to(device, dtype)
        w = (torch.randn((cout, cin), generator=g) / cin ** 0.5).to(device, dtype)
        b = torch.randn((cout,), generator=g).to(device, dtype) if with_bias else None
        top = _layout(torch.randn((n, cout, *top_hw), generator=g), layout).to(device, dtype) if top_hw else None
        dy = torch.randn((n, cout, *hw), generator=g).to(device, dtype)
        cases.append((x, w, b, top, dy))
    return cases


def _run(case, backend):
    """Forward and backward on fresh leaves: (out, {name: grad or None})."""
    *ins, dy = case
    leaves = [None if t is None else t.detach().requires_grad_() for t in ins]
    out = fused_fpn.lateral(*leaves, backend=backend)
    out.backward(dy)
    return out.detach(), {name: (None if t is None else t.grad) for name, t in zip(GRAD_NAMES, leaves)}


def _bitwise_grads(device, backend):
    """Gradients that must be bit-identical to the single-threaded ones, as test_properties.py's
    determinism property claims run to run: on the CPU all of them; on CUDA all four for the fused
    backends (Triton's kernels have no atomics; "cuda" has its db + dtop kernel and dx, dW as cuBLAS
    GEMMs, fused_fpn::conv1x1_backward); none for the "torch" reference (cuDNN's convolution backward).
    The rest are compared to a tight tolerance."""
    if device == "cpu":
        return GRAD_NAMES
    return {"triton": GRAD_NAMES, "cuda": GRAD_NAMES}.get(backend, ())


@pytest.mark.parametrize("device,backend", backend_params())
def test_threads_calling_at_once_get_the_single_threaded_results(device, backend):
    cases = _cases(device, backend)
    results, errors = {}, []
    barrier = threading.Barrier(THREADS)

    def worker(k):
        try:
            barrier.wait(timeout=JOIN_TIMEOUT_S)
            for i in range(CALLS):
                j = (k * 5 + i * (k + 1)) % len(cases)    # each thread its own order over the shapes
                results[(k, i)] = (j, _run(cases[j], backend))
            if device == "cuda":
                torch.cuda.synchronize()
        except BaseException as exc:  # noqa: BLE001 - reported below with the thread's number
            errors.append(f"thread {k}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(k,), name=f"lateral-{k}") for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    assert len(results) == THREADS * CALLS
    assert len({j for j, _ in results.values()}) == len(cases), "every shape ran concurrently"

    expected = [_run(case, backend) for case in cases]       # single-threaded, after the race
    bitwise = _bitwise_grads(device, backend)
    for (k, i), (j, (out, grads)) in sorted(results.items()):
        exp_out, exp_grads = expected[j]
        assert torch.equal(out, exp_out), f"thread {k} call {i} (shape {j}): forward differs"
        for name in GRAD_NAMES:
            a, e = grads[name], exp_grads[name]
            assert (a is None) == (e is None)
            if a is None:
                continue
            if name in bitwise:
                assert torch.equal(a, e), f"thread {k} call {i} (shape {j}): grad of {name} differs"
            else:
                torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_threads_running_fpn_modules_at_once(device):
    """The whole FPN module (backend "auto") from several threads, one module shared by all."""
    fpn = fused_fpn.FPN([5, 9, 17], 12, extra_blocks=fused_fpn.LastLevelMaxPool()).to(device).eval()
    g = torch.Generator().manual_seed(7)
    feats = [{f"c{i}": torch.randn((n, c, s, s + 1), generator=g).to(device)
              for i, (c, s) in enumerate(zip((5, 9, 17), (20, 10, 5)))} for n in (1, 2, 3)]
    results, errors = {}, []
    barrier = threading.Barrier(THREADS)

    def worker(k):
        try:
            barrier.wait(timeout=JOIN_TIMEOUT_S)
            for i in range(CALLS // 2):
                j = (k + i) % len(feats)
                with torch.no_grad():
                    results[(k, i)] = (j, fpn(feats[j]))
        except BaseException as exc:  # noqa: BLE001
            errors.append(f"thread {k}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    with torch.no_grad():
        expected = [fpn(f) for f in feats]
    for (k, i), (j, out) in results.items():
        assert list(out) == list(expected[j])
        for name in out:
            assert torch.equal(out[name], expected[j][name]), f"thread {k} call {i}: level {name} differs"


@pytest.mark.skipif("triton" not in fused_fpn.available_backends("cpu"), reason="Triton interpreter not active")
def test_triton_interpreter_threads():
    """Interpreted Triton launches from 3 threads at once (serialized by the launcher's lock) give the
    single-threaded results bit for bit, forward and backward, over several rounds whose calls are in
    flight at the same time (asserted: without the lock the interpreter's module-wide patching breaks
    the launches of the other threads)."""
    g = torch.Generator().manual_seed(11)
    cases = [(torch.randn(1, 5, 6, 7, generator=g), torch.randn(4, 5, generator=g), torch.randn(4, generator=g),
              torch.randn(1, 4, 3, 4, generator=g)) for _ in range(3)]
    rounds = 4

    def run(case):
        x, w, b, t = [v.clone().requires_grad_() for v in case]
        y = fused_fpn.lateral(x, w, b, t, backend="triton")
        y.sum().backward()
        return [y.detach()] + [v.grad for v in (x, w, b, t)]

    results = [[None] * rounds for _ in cases]
    spans = [[None] * rounds for _ in cases]   # (start, end) of each call
    errors = []
    barrier = threading.Barrier(len(cases))

    def worker(i):
        try:
            for r in range(rounds):
                barrier.wait()
                start = time.perf_counter()
                results[i][r] = run(cases[i])
                spans[i][r] = (start, time.perf_counter())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(JOIN_TIMEOUT_S)
    assert not errors, errors
    overlapping = [r for r in range(rounds)
                   if max(spans[i][r][0] for i in range(len(cases))) < min(spans[i][r][1] for i in range(len(cases)))]
    assert overlapping, f"no round had the threads' calls in flight at once: {spans}"
    for i, case in enumerate(cases):
        expected = run(case)
        for r in range(rounds):
            for got, want in zip(results[i][r], expected):
                assert torch.equal(got, want), f"thread {i} round {r} differs"


@pytest.mark.skipif("triton" not in fused_fpn.available_backends("cpu"), reason="Triton interpreter not active")
def test_autotuning_is_not_broken_by_a_launch_from_another_thread(monkeypatch):
    """Thread A autotunes a new shape (two configs); in the middle of its first config's benchmark,
    thread B launches the same autotuned kernel on a shape already tuned. triton's Autotuner.run keeps
    its arguments in ``self.nargs`` and clears them when it returns, so without the launcher's lock B's
    call wipes A's arguments and A's next benchmark fails with a TypeError (seen with triton 3.8 when
    the lock is taken out). With the lock B waits until A is done: both calls succeed, B's after A's.
    The launcher runs its GPU path (``_launch`` through ``wrap_triton``) on an interpreted kernel."""
    import triton
    import triton.language as tl

    from fused_fpn.kernels import lateral_launch as L

    @triton.jit
    def _scale(src, dst, n, factor, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask) * factor, mask=mask)

    blocking = threading.Event()
    a_benchmarking = threading.Event()
    b_done = threading.Event()
    order = []

    def do_bench(fn, quantiles=None, **_):
        if blocking.is_set() and not a_benchmarking.is_set():
            a_benchmarking.set()
            b_done.wait(timeout=2.0)   # B gets in here unless the launcher serializes launches
        fn()
        return [1.0, 1.0, 1.0] if quantiles else 1.0

    tuned = triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})],
                            key=["n"], do_bench=do_bench)(_scale)
    monkeypatch.setattr(L, "interpreting", lambda: False)   # the compiled-kernel branch of _launch

    def launch(n, tag):
        src = torch.arange(n, dtype=torch.float32)
        dst = torch.full((n,), float("nan"))
        with L.as_in_the_op_body():   # as the op's body launches (torch 2.11 fails otherwise here)
            L._launch(tuned, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), (src, dst, n, 2.0), {})
        order.append(tag)
        assert torch.equal(dst, 2.0 * src), f"{tag}: wrong result"

    launch(40, "warm-up")       # B's shape (n = 40) is tuned before the threads start
    blocking.set()
    errors = []

    def thread_a():
        try:
            launch(100, "A")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"A: {exc!r}")

    def thread_b():
        try:
            assert a_benchmarking.wait(timeout=30), "thread A never started autotuning"
            launch(40, "B")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"B: {exc!r}")
        finally:
            b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors
    assert order == ["warm-up", "A", "B"], order
