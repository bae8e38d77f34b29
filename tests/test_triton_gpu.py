"""Checks of the "triton" backend that only a GPU can make (they skip without one; the parity,
opcheck and compile tests of test_triton_interpret.py run on CUDA tensors there too):

* the fp32 path follows torch.backends.cudnn.allow_tf32 (the interpreter's tl.dot is exact fp32,
  so the flag has no visible effect there);
* the forward and backward ops capture into a CUDA graph and replay correctly (no host sync, no
  allocation outside the caching allocator);
* 64-bit offsets: a tensor with more than 2^31 elements.
"""
from __future__ import annotations

import pytest
import torch

import fused_fpn
from fused_fpn import backends as fb
from fused_fpn.reference import lateral_grad_bias_top_reference, lateral_reference

from fpn_testing import HAS_CUDA, make_input, only_tma_config, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def restore_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _require_backend():
    reason = fb.unavailable_reason("triton")
    assert reason is None, f"a GPU is present, so the triton backend must be available: {reason}"


def test_fp32_follows_cudnn_allow_tf32():
    _require_backend()
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 256, 24, 40), generator=g).cuda().contiguous(memory_format=torch.channels_last)
    w = (torch.randn((256, 256), generator=g) / 16).cuda()
    b = torch.randn((256,), generator=g).cuda()
    top = torch.randn((2, 256, 12, 20), generator=g).cuda()
    ref = lateral_reference(x.double(), w.double(), b.double(), top.double())
    torch.backends.cudnn.allow_tf32 = False
    ieee = fused_fpn.lateral(x, w, b, top, backend="triton")
    torch.backends.cudnn.allow_tf32 = True
    tf32 = fused_fpn.lateral(x, w, b, top, backend="triton")
    e_ieee, e_tf32 = rel_err(ieee, ref), rel_err(tf32, ref)
    assert e_ieee < 1e-5, f"IEEE fp32 error {e_ieee:.3g}"
    assert e_tf32 < 5e-3, f"TF32 error {e_tf32:.3g}"
    assert e_tf32 > 10 * e_ieee, f"allow_tf32 had no effect: {e_tf32:.3g} vs {e_ieee:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_graph_capture_and_replay(dtype):
    _require_backend()
    from fused_fpn.backends import triton as tb
    fwd, bwd = tb.ops()
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 64, 30, 38), generator=g).to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn((48, 64), generator=g) / 8).to("cuda", dtype)
    b = torch.randn((48,), generator=g).to("cuda", dtype)
    top = torch.randn((2, 48, 15, 19), generator=g).to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn((2, 48, 30, 38), generator=g).to("cuda", dtype).contiguous(memory_format=torch.channels_last)

    def step():
        return fwd(x, w, b, top), bwd(grad, x, w, 15, 19, True, True, True, True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning happens here, outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph, grads_graph = step()
    # new inputs in the captured buffers, then replay
    x.copy_(torch.randn(x.shape, generator=g).to("cuda", dtype))
    top.copy_(torch.randn(top.shape, generator=g).to("cuda", dtype))
    grad.copy_(torch.randn(grad.shape, generator=g).to("cuda", dtype))
    graph.replay()
    torch.cuda.synchronize()
    y_eager, grads_eager = step()
    assert torch.equal(y_graph, y_eager)
    for a, e in zip(grads_graph, grads_eager):
        assert torch.equal(a, e)
    # and the replayed values are right, not merely repeatable
    db_ref, dtop_ref = lateral_grad_bias_top_reference(grad.double(), 15, 19)
    torch.testing.assert_close(grads_graph[3].double(), dtop_ref, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(grads_graph[2].double(), db_ref, atol=5e-1, rtol=2e-2)


@pytest.mark.parametrize("dtype,layout", [(torch.float32, "channels_last"), (torch.float16, "nchw"),
                                          (torch.bfloat16, "strided")], ids=str)
def test_binary_launches_match_the_jit_and_capture(dtype, layout, monkeypatch):
    """FUSED_FPN_TRITON_EXPERIMENTAL=1's binary launches (lateral_launch._launch_binary: a launch made
    before runs the binary triton's JIT returned for it, without JITFunction.run): forward and all four
    gradients, on launches whose configs the switch does not change (fp32 with TF32 off, NCHW pixels
    loaded one at a time, a strided x), are bit for bit the JIT's, once through the JIT and twice from
    the kept binaries (which must then exist for the forward's, dW's and db + dtop's kernels); a
    misaligned x gets its own binary; a CUDA graph captures the binary launches and replays them.
    Autotuning off: the switch's longer lists start with the default ones."""
    _require_backend()
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    torch.backends.cudnn.allow_tf32 = False
    monkeypatch.setenv(K.AUTOTUNE_ENV, "0")   # each list's first config: the experimental lists' too
    g = torch.Generator().manual_seed(11)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    # Cout 72 / Cin 56: a key no other test of this module tunes; H * W odd (NCHW: the narrow lists)
    x = make_input((2, 56, 15, 19), dtype, "cuda", "noncontig" if layout == "strided" else layout, g)
    w, b = (torch.randn((72, 56), generator=g) / 8).to("cuda", dtype), torch.randn((72,), generator=g).to("cuda", dtype)
    top = torch.randn((2, 72, 8, 10), generator=g).to("cuda", dtype).contiguous(memory_format=fmt)
    grad = torch.randn((2, 72, 15, 19), generator=g).to("cuda", dtype).contiguous(memory_format=fmt)

    def step(xx=x):
        return (L.run_directly(L.lateral_forward, xx, w, b, top),) + \
            L.run_directly(L.lateral_backward, grad, xx, w, 8, 10, True, True, True, True)

    monkeypatch.delenv(K.EXPERIMENTAL_ENV, raising=False)
    want = step()
    monkeypatch.setenv(K.EXPERIMENTAL_ENV, "1")
    for attempt in range(3):
        got = step()
        for name, a, e in zip(("y", "dx", "dW", "db", "dtop"), got, want):
            assert torch.equal(a, e), f"pass {attempt}: {name} differs from the JIT's"
    from triton.runtime.autotuner import Autotuner
    kept = {seen[0].fn if isinstance(seen[0], Autotuner) else seen[0]
            for seen, launches in L._BINARY_LAUNCHES.items() if launches.binaries}
    assert {K._lateral_fwd_kernel, K._lateral_grad_weight_kernel, K._lateral_grad_bias_top_kernel} <= kept
    # x one element off 16 bytes: another binary key (triton's alignment specialization), the same values
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))
    x_off = torch.as_strided(torch.empty(span + 1, device="cuda", dtype=dtype)[1:], x.shape, x.stride())
    x_off.copy_(x)
    for _ in range(2):
        assert all(torch.equal(a, e) for a, e in zip(step(x_off), want))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(torch.randn(x.shape, generator=g).to("cuda", dtype))
    graph.replay()
    torch.cuda.synchronize()
    monkeypatch.delenv(K.EXPERIMENTAL_ENV)
    for name, a, e in zip(("y", "dx", "dW", "db", "dtop"), captured, step()):
        assert torch.equal(a, e), f"replay: {name} differs from the JIT's"

class _Fp16ChannelsLastCase:
    """A channels_last fp16 lateral call on the GPU (x [2, cin, h, w], Cout 80, a top of half the
    size) for the tests that run one experimental config: ``check`` compares an output with the
    float64 reference; ``graph_replay`` captures the call into a CUDA graph, gives x and top new
    values and replays it."""

    def __init__(self, seed, cin, h, w):
        self.g = torch.Generator().manual_seed(seed)
        cl = dict(memory_format=torch.channels_last)
        self.x = torch.randn((2, cin, h, w), generator=self.g).to("cuda", torch.float16).contiguous(**cl)
        self.w = (torch.randn((80, cin), generator=self.g) / 8).to("cuda", torch.float16)
        self.b = torch.randn((80,), generator=self.g).to("cuda", torch.float16)
        self.top = torch.randn((2, 80, (h + 1) // 2, (w + 1) // 2), generator=self.g).to("cuda", torch.float16)
        self.top = self.top.contiguous(**cl)

    def run(self):
        return fused_fpn.lateral(self.x, self.w, self.b, self.top, backend="triton")

    def check(self, y, label):
        ref = lateral_reference(*(t.double() for t in (self.x, self.w, self.b, self.top)))
        err = rel_err(y, ref)
        assert err < 2e-3, f"{label}: relative error {err:.3g}"

    def graph_replay(self):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_graph = self.run()
        for t in (self.x, self.top):
            t.copy_(torch.randn(t.shape, generator=self.g).to("cuda", torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        return y_graph


@pytest.mark.parametrize("persistent", [False, True], ids=["tiles", "persistent"])
def test_tma_forward_in_threads_and_cuda_graphs(persistent, monkeypatch):
    """The forward with a TMA config (experimental; x and W through device-built descriptors, which
    need triton's scratch allocator) as the only config of its list: eager in this thread and in a
    new one (triton's allocator is per thread: the launcher sets one where none is), and captured
    into a CUDA graph and replayed with new inputs (the scratch comes from the graph's pool), each
    against the float64 reference. (Traces are never offered the TMA configs: ``tma_loads``.)"""
    import threading

    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    _require_backend()
    if L._arch(torch.device("cuda")) != "sm90":
        pytest.skip("the TMA configs are offered on sm_90 only")
    cfg = [c for c in K.TMA_FWD_CONFIGS[("sm90", "16bit")] if c.kwargs["PERSISTENT"] == persistent][0]
    only_tma_config(monkeypatch, ("sm90", "16bit"), cfg)
    case = _Fp16ChannelsLastCase(4, 96, 50, 38)
    with L.recording_autotune_choices() as chosen:
        case.check(case.run(), "eager")
    assert list(chosen.values()) == [L.describe_config(cfg.all_kwargs())] and list(chosen)[0].endswith(" tma")
    in_thread = {}
    thread = threading.Thread(target=lambda: in_thread.update(y=case.run()))
    thread.start()
    thread.join()
    case.check(in_thread["y"], "a new thread")
    case.check(case.graph_replay(), "CUDA graph replay")


@pytest.mark.parametrize("block_k", [128, 256])
def test_resident_weight_forward_is_offered_and_captured(block_k, monkeypatch):
    """The forward with a weight-stationary config (experimental, RESIDENT_W) as the only config the
    launcher offers: the launch of a channels_last x with 96 (200) channels takes the list of the
    smallest BLOCK_K >= 96 (200) from a table that also holds a BLOCK_K 512 config, eager and
    captured into a CUDA graph and replayed with new inputs, against the float64 reference; 64 x 48
    x 2 pixels: 96 row tiles of 64 for the SMs' programs to walk."""
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    _require_backend()
    key = (L._arch(torch.device("cuda")), "16bit")
    if key[0] != "sm90":
        pytest.skip("the weight-stationary configs are offered on sm_90 only")
    cfg = [c for c in K.RESIDENT_FWD_CONFIGS[key] if c.kwargs["BLOCK_K"] == block_k][0]
    monkeypatch.setenv(K.EXPERIMENTAL_ENV, "1")
    for table in (K.FWD_CONFIGS, K.EXPERIMENTAL_FWD_CONFIGS, K.TMA_FWD_CONFIGS):
        monkeypatch.setitem(table, key, [])
    monkeypatch.setitem(K.RESIDENT_FWD_CONFIGS, key, [K._cfg(64, 256, 512, 4, 1, resident=True), cfg])
    case = _Fp16ChannelsLastCase(6, 96 if block_k == 128 else 200, 64, 48)
    with L.recording_autotune_choices() as chosen:
        case.check(case.run(), "eager")
    assert list(chosen.values()) == [L.describe_config(cfg.all_kwargs())]
    case.check(case.graph_replay(), "CUDA graph replay")


def _assert_warmed_up_call_captures_and_replays(fwd, x, w, g):
    """fwd(x, w) (fp16, no bias or top) captured in a CUDA graph, x refilled, replayed: the replay
    equals an eager call on the new x."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fwd(x, w, None, None)
    x.copy_(torch.randn(x.shape, generator=g).to("cuda", torch.float16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, fwd(x, w, None, None))


def test_first_call_of_a_shape_inside_a_capture_raises_a_clear_error():
    """A Triton call whose shape was never run before cannot be tuned or loaded inside a CUDA-graph
    capture: a RuntimeError says so before anything is launched, and the same call, warmed up
    first, captures and replays."""
    _require_backend()
    fwd, _ = fb.get_backend("triton").ops()
    g = torch.Generator().manual_seed(3)
    # Cout 88 / Cin 72: a key no other test of this module tunes
    x = torch.randn((1, 72, 17, 23), generator=g).to("cuda", torch.float16)
    w = (torch.randn((88, 72), generator=g) / 8).to("cuda", torch.float16)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="first call for this shape .* inside a CUDA-graph capture"):
        with torch.cuda.graph(graph):
            fwd(x, w, None, None)
    fwd(x, w, None, None)   # warm-up outside the capture
    _assert_warmed_up_call_captures_and_replays(fwd, x, w, g)


def test_a_capture_needing_a_binary_the_warm_up_did_not_load_raises_a_clear_error():
    """triton specializes a binary on its pointers' 16-byte alignment too. Warmed up with an aligned x,
    a capture of the same call with x one element off 16 bytes (same shape, strides and tuning key)
    needs a binary that no call loaded: a RuntimeError says so before anything is launched (not
    CUDA's "operation not permitted when stream is capturing"), and after an eager call with such an
    x the capture replays."""
    _require_backend()
    fwd, _ = fb.get_backend("triton").ops()
    g = torch.Generator().manual_seed(4)
    # Cout 56 / Cin 40, channels_last: a key no other test of this module tunes
    x = torch.randn((1, 40, 13, 11), generator=g).to("cuda", torch.float16).contiguous(memory_format=torch.channels_last)
    w = (torch.randn((56, 40), generator=g) / 8).to("cuda", torch.float16)
    buf = torch.empty(x.numel() + 1, device="cuda", dtype=torch.float16)
    x_off = buf[1:].view(1, 13, 11, 40).permute(0, 3, 1, 2)   # channels_last, 2 bytes past 16-byte alignment
    x_off.copy_(x)
    assert x_off.stride() == x.stride() and x_off.data_ptr() % 16 == 2
    want = fwd(x, w, None, None)   # the warm-up, aligned
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="needs a kernel binary that no call before the capture loaded"):
        with torch.cuda.graph(graph):
            fwd(x_off, w, None, None)
    assert torch.equal(fwd(x_off, w, None, None), want)   # eager: compiles and loads that binary
    _assert_warmed_up_call_captures_and_replays(fwd, x_off, w, g)


def test_more_than_2_to_31_elements():
    """x and out have 2^31 + 2^24 elements: every offset into them must be 64-bit."""
    _require_backend()
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:
        pytest.skip(f"needs ~20 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    c, w_size = 16, 2**27 + 2**20
    x = torch.empty((1, c, 1, w_size), device="cuda", dtype=torch.float16)
    x.normal_()
    weight = (torch.randn((c, c), device="cuda") / 4).half()
    top = torch.randn((1, c, 1, 3), device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    out = fused_fpn.lateral(x, weight, None, top, backend="triton")
    for sl in (slice(0, 4096), slice(w_size - 4096, w_size)):
        xs = x[..., sl].double()
        ref = torch.einsum("nchw,oc->nohw", xs, weight.double())
        idx = fused_fpn.nearest_source_indices(3, w_size, "cuda")[sl]
        ref = ref + top.double()[..., idx]
        torch.testing.assert_close(out[..., sl].double(), ref, atol=2e-2, rtol=1e-2)


def test_autotuning_keys_on_the_bucket_of_the_pixel_count(monkeypatch):
    """Two image sizes whose N*H*W fall in one power-of-two bucket share the autotuner's choice (a
    detector seeing a new image size does not re-tune); another bucket, the other layout and the
    backward's dx (W transposed) each tune anew. Every result matches the float64 reference."""
    _require_backend()
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    monkeypatch.setenv(K.AUTOTUNE_ENV, "1")   # gpu_run.sh runs the suite with autotuning off
    g = torch.Generator().manual_seed(0)
    # channel counts no other test tunes with the default lists (the per-config checks below use them
    # through autotuners of their own): this test's keys are new
    cin, cout = 72, 40
    tuner = K.autotuned_fwd(L._arch(torch.device("cuda")), "16bit")
    w = (torch.randn((cout, cin), generator=g) / 8).to("cuda", torch.float16)

    def run(h, wd, memory_format=torch.channels_last):
        x = torch.randn((1, cin, h, wd), generator=g).to("cuda", torch.float16).contiguous(
            memory_format=memory_format)
        out = fused_fpn.lateral(x, w, None, None, backend="triton")
        ref = torch.einsum("nchw,oc->nohw", x.double(), w.double())
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=1e-2)
        return {k for k in tuner.cache if k[1:3] == (cout, cin)}   # key: (TUNE_KEY, COUT, CIN, dtypes)

    first = run(40, 50)        # 2000 pixels: bucket 2048
    assert len(first) == 1, first
    assert run(44, 46) == first    # 2024 pixels: the same bucket, no new tuning
    assert len(run(40, 60)) == 2   # 2400 pixels: bucket 4096
    assert len(run(40, 50, torch.contiguous_format)) == 3   # NCHW x and out: other layout bits


# relative L2 error bound of a config's result against the float64 reference, by dtype and list kind
# ("tf32": fp32 through TF32 tensor cores, 10 mantissa bits like fp16; "ieee": exact fp32 dot)
_CONFIG_REL_ERR = {(torch.float16, "16bit"): 2e-3, (torch.bfloat16, "16bit"): 1.6e-2,
                   (torch.float32, "tf32"): 2e-3, (torch.float32, "ieee"): 1e-5}


def _config_case(dtype, layout, narrow):
    """Inputs and float64 results for checking one config: more output tiles than SMs (M = 19594 or
    19600: 154 tiles of 128 rows), so a persistent config's programs each walk several tiles. For the
    NARROW_* lists (``narrow``) 97 x 101 pixels in NCHW, whose odd H * W the kernels load one element
    at a time (the narrow route); else 98 x 100, whose NCHW runs are 8 pixels aligned (PIX_ALIGN 8
    for fp16, 4 for fp32: the default lists' route, as ResNet-50-FPN's P4 in NCHW)."""
    g = torch.Generator().manual_seed(3)
    h, w_ = (97, 101) if narrow else (98, 100)
    x = make_input((2, 72, h, w_), dtype, "cuda", layout, g)
    w = (torch.randn((40, 72), generator=g) / 8).to("cuda", dtype)
    b = torch.randn((40,), generator=g).to("cuda", dtype)
    top = make_input((2, 40, 49, 51), dtype, "cuda", layout, g)
    grad = make_input((2, 40, h, w_), dtype, "cuda", layout, g)
    f64 = [t.double() for t in (x, w, b, top, grad)]
    from fused_fpn.reference import lateral_backward_reference
    dx_ref, dw_ref, _, _ = lateral_backward_reference(f64[4], f64[0], f64[1], (49, 51), (True, True, False, False))
    return (x, w, b, top, grad), {"y": lateral_reference(*f64[:4]), "dx": dx_ref, "dW": dw_ref}


def _check_config_alone(monkeypatch, label, narrow, key, cfg, inputs, refs, dtype, tma=False):
    """Run ``cfg`` as the only config of the ``label`` kernel's list for ``key`` (the NARROW_* one when
    ``narrow``; with ``tma``, the forward's TMA list, FUSED_FPN_TRITON_EXPERIMENTAL=1 and the forward
    alone: dx is never offered those) through the real launch path (forward with bias + top and the
    backward's dx for the forward lists, dW for the weight-gradient lists), check that every launch
    took that list, and compare with the float64 results. False if the config does not fit this
    GPU's shared memory."""
    from fused_fpn.backends import triton as tb
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    from triton.runtime.errors import OutOfResources
    x, w, b, top, grad = inputs
    _, bwd = tb.ops()
    if tma:
        only_tma_config(monkeypatch, key, cfg)
    elif label == "forward":
        monkeypatch.setitem(K.NARROW_FWD_CONFIGS if narrow else K.FWD_CONFIGS, key, [cfg])
    else:
        monkeypatch.setitem(K.NARROW_GRAD_WEIGHT_CONFIGS if narrow else K.GRAD_WEIGHT_CONFIGS, key, [cfg])
    try:
        with L.recording_autotune_choices() as chosen:
            if tma:
                got = {"y": fused_fpn.lateral(x, w, b, top, backend="triton")}
            elif label == "forward":
                got = {"y": fused_fpn.lateral(x, w, b, top, backend="triton"),
                       "dx": bwd(grad, x, w, 49, 51, True, False, False, False)[0]}
            else:
                got = {"dW": bwd(grad, x, w, 49, 51, False, True, False, False)[1]}
            torch.cuda.synchronize()
    except OutOfResources:   # an sm80-list config on a part with less shared memory
        return False
    routes = {what: what.endswith(" narrow") for what in chosen}
    assert len(routes) == len(got) and all(r == narrow for r in routes.values()), \
        f"{label} config {cfg} (narrow={narrow}) launched as {routes}"
    assert all(what.endswith(" tma") == tma and ("TMA=True" in how) == tma for what, how in chosen.items()), \
        f"{label} config {cfg} (tma={tma}) launched as {chosen}"
    resident = bool(cfg.kwargs.get("RESIDENT_W"))
    assert all(("RESIDENT_W=True" in how) == resident for how in chosen.values()), \
        f"{label} config {cfg} launched as {chosen}"
    bound = _CONFIG_REL_ERR[(dtype, key[1])]
    for name, tensor in got.items():
        err = rel_err(tensor, refs[name])
        assert err < bound, f"{label} config {cfg}: {name} relative error {err:.3g} >= {bound:g}"
    return True


def _config_tables():
    """table name -> {(arch, kind): configs} of the per-config test (the experimental table: those
    ``fwd_configs(..., experimental=True)`` adds; the TMA table: those it adds with ``tma`` too; the
    resident table: the weight-stationary ones it adds for a reduction that fits their BLOCK_K, here
    Cin 72 and dx's 40, which every one of them fits)."""
    from fused_fpn.kernels import lateral_kernels as K
    return {"forward": K.FWD_CONFIGS, "narrow forward": K.NARROW_FWD_CONFIGS,
            "weight gradient": K.GRAD_WEIGHT_CONFIGS, "narrow weight gradient": K.NARROW_GRAD_WEIGHT_CONFIGS,
            "experimental": K.EXPERIMENTAL_FWD_CONFIGS, "tma": K.TMA_FWD_CONFIGS, "resident": K.RESIDENT_FWD_CONFIGS}


# the config lists each dtype runs through: fp32 takes the "tf32" list with TF32 on, "ieee" with it off
_DTYPE_KINDS = ((torch.float16, "16bit"), (torch.bfloat16, "16bit"), (torch.float32, "tf32"), (torch.float32, "ieee"))


def _config_params():
    """(dtype, kind, table, index) for every config of every list, the longest of the two arches'
    lists for each kind (a GPU whose list is shorter skips the indices past its end)."""
    try:
        tables = _config_tables()
    except ImportError:   # no triton: every test of this file skips anyway
        return []
    params = []
    for dtype, kind in _DTYPE_KINDS:
        for table, configs in tables.items():
            longest = max((len(configs.get((arch, kind), [])) for arch in ("sm90", "sm80")), default=0)
            name = str(dtype)[6:] + ("" if kind == "16bit" else f"_{kind}")
            params += [pytest.param(dtype, kind, table, i, id=f"{name}-{table.replace(' ', '_')}-{i}")
                       for i in range(longest)]
    return params


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype,kind,table,index", _config_params())
def test_every_autotune_config_matches_the_reference(dtype, kind, table, index, layout, monkeypatch, no_tf32):
    """Each config of the forward lists (forward with bias + top, and the backward's dx = dy . W^T), of
    the weight-gradient lists (the default ones in both layouts, the NARROW_* ones in NCHW of odd
    H * W, each launch checked to take its list) and of the forward's experimental (persistent; TMA:
    channels_last, the forward alone; weight-stationary: channels_last) configs, run alone through
    the real launch path against the float64 results: the autotuner may pick any of them, and the
    rest of the suite runs with whichever it (or, with autotuning off, the list's first) picks. fp32
    runs each config of the "tf32" lists with TF32 on and each of the "ieee" lists with it off (the
    launch takes the list of the flag's setting). One test per config, so that each test compiles one or two
    kernels (a flattened persistent loop compiles slowly: 16-32 s per NCHW config on the 2-core dev
    machine)."""
    _require_backend()
    from fused_fpn.kernels import lateral_kernels as K
    from fused_fpn.kernels import lateral_launch as L
    key = (L._arch(torch.device("cuda")), kind)
    configs = _config_tables()[table].get(key, [])
    if index >= len(configs):
        pytest.skip(f"{table} {key}: {len(configs)} configs")
    torch.backends.cudnn.allow_tf32 = kind == "tf32"   # no_tf32 restores the flags afterwards
    monkeypatch.delenv(K.EXPERIMENTAL_ENV, raising=False)   # the list patched is then the whole list
    narrow = table.startswith("narrow")
    if narrow and layout != "nchw":
        pytest.skip("the narrow lists serve operands whose channels are not contiguous")
    if table == "tma" and layout != "channels_last":
        pytest.skip("the TMA configs serve channels_last x only (tma_loads)")
    if table == "resident" and layout != "channels_last":
        pytest.skip("the weight-stationary configs serve x with unit channel stride only (resident_reduction)")
    inputs, refs = _config_case(dtype, layout, narrow)
    cfg = configs[index]
    label = "weight gradient" if table.endswith("weight gradient") else "forward"
    fits = _check_config_alone(monkeypatch, label, narrow, key, cfg, inputs, refs, dtype, tma=table == "tma")
    if not fits and key[0] == "sm80":   # an sm80-list config on a part with less shared memory
        pytest.skip(f"{cfg} does not fit this GPU's shared memory")
    assert fits, f"{table} config {cfg} does not fit this {key[0]} GPU's shared memory"
