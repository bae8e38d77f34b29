"""Every autotune config of every Triton kernel compiles ahead of time for sm_90 and sm_80 (no GPU
needed): ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``.

The compiles run in a subprocess (``python -m fused_fpn.kernels.aot``) without TRITON_INTERPRET,
because under the interpreter ``@triton.jit`` gives interpreted functions the compiler cannot take,
and with a fresh TRITON_CACHE_DIR in pytest's tmp dir so every config is really compiled (nothing is
cached in the repository). The compiles (470 jobs) took 393 s on the 2-core dev machine in a full
`make test` on 2026-12-06: most of this file's time, and the slowest setup of the suite.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from fused_fpn.kernels import lateral_kernels as K  # noqa: E402
from fused_fpn.kernels.aot import SHARED_LIMIT, jobs, kind_of  # noqa: E402

ARCHS = (90, 80)
pytestmark = pytest.mark.slow  # ~6-7 minutes on 2 cores (the module fixture); still part of `make test`


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Compile everything: one driver process per arch, run side by side (CI has 2 cores)."""
    tmp = tmp_path_factory.mktemp("triton_aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")
    procs = []
    for arch in ARCHS:
        out = tmp / f"aot_sm{arch}.json"
        cmd = [sys.executable, "-m", "fused_fpn.kernels.aot", "--arch", str(arch), "--json", str(out)]
        procs.append((out, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True)))
    results = []
    for out, proc in procs:
        _, err = proc.communicate(timeout=900)
        assert out.exists(), f"AOT driver wrote no results (rc {proc.returncode}):\n{err[-4000:]}"
        results += json.loads(out.read_text())
    return results


def _label(r):
    return (f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['layout']} {r['sizes']} {r['trace']} tf32={r['tf32']} "
            f"{r['meta']} warps={r['num_warps']} stages={r['num_stages']}" + (f" {r['flags']}" if r["flags"] else ""))


def _eager(r, sizes=("P2",)) -> bool:
    """A job of concrete sizes (a call outside a trace) at one of ``sizes``."""
    return r["trace"] == "eager" and r["sizes"] in sizes


def test_every_config_of_every_kernel_is_compiled(results):
    """The driver covered each (arch, kind) config list completely (nothing silently dropped): the
    forward's (with the experimental configs, the TMA ones as the forward, and every weight-stationary
    one) as the forward and as dx, the weight gradient's."""
    assert len(results) == len(jobs(ARCHS))
    for arch in ARCHS:
        a = f"sm{arch}"
        for kind in K.KINDS:
            resident = K.RESIDENT_FWD_CONFIGS.get((a, kind), [])
            for kernel, configs in (("fwd", K.fwd_configs(a, kind, experimental=True, tma=True) + resident),
                                    ("fwd_dx", K.fwd_configs(a, kind, experimental=True) + resident),
                                    ("grad_weight", K.GRAD_WEIGHT_CONFIGS[(a, kind)])):
                want = {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in configs}
                got = {(tuple(sorted(r["meta"].items())), r["num_warps"], r["num_stages"]) for r in results
                       if r["kernel"] == kernel and r["arch"] == arch and kind_of(r) == kind and _eager(r)}
                assert got == want, f"{kernel} {a} {kind} configs compiled {got} != listed {want}"
            # the NARROW_* lists: the forward and dx as a trace compiles them in NCHW, the weight
            # gradient at P5 in NCHW
            for kernel, configs, trace in (("fwd", K.fwd_configs(a, kind, narrow=True), "symbolic"),
                                           ("fwd_dx", K.fwd_configs(a, kind, narrow=True), "symbolic"),
                                           ("grad_weight", K.grad_weight_configs(a, kind, narrow=True), "eager")):
                want = {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in configs}
                got = {(tuple(sorted(r["meta"].items())), r["num_warps"], r["num_stages"]) for r in results
                       if r["kernel"] == kernel and r["arch"] == arch and kind_of(r) == kind and r["narrow"]
                       and r["trace"] == trace}
                assert got == want, f"narrow {kernel} {a} {kind} configs compiled {got} != listed {want}"
        assert {r["dtype"] for r in results if r["kernel"] == "grad_bias_top" and r["arch"] == arch and _eager(r)} \
            == {"fp16", "bf16", "fp32"}


def test_all_compile(results):
    failed = [f"{_label(r)}: {r['error']}" for r in results if not r["ok"]]
    assert not failed, "configs that do not compile:\n" + "\n".join(failed)
    assert all(r["has_cubin"] for r in results)


def test_shared_memory_within_limits(results):
    over = [f"{_label(r)}: {r['shared']} B > {SHARED_LIMIT[r['arch']]} B" for r in results
            if r["ok"] and r["shared"] > SHARED_LIMIT[r["arch"]]]
    assert not over, "configs over the shared-memory limit:\n" + "\n".join(over)
    assert all(r["shared"] > 0 for r in results if r["ok"] and not (r["kernel"] == "grad_bias_top" and _eager(r)))


def test_sm90_fp16_bf16_forward_uses_wgmma(results):
    """The forward (and the same kernel as dx in the backward) and the weight gradient use
    Hopper's wgmma on sm_90 for fp16/bf16."""
    fwd = [r for r in results if r["kernel"] in ("fwd", "fwd_dx", "grad_weight") and r["arch"] == 90
           and r["dtype"] in ("fp16", "bf16")]
    assert fwd and {r["dtype"] for r in fwd} == {"fp16", "bf16"}
    missing = [_label(r) for r in fwd if not r["wgmma"]]
    assert not missing, "sm_90 fp16/bf16 forward configs without wgmma:\n" + "\n".join(missing)


def test_gemm_configs_are_software_pipelined(results):
    """Every forward / dx / weight-gradient config with 2+ stages compiles to a pipelined K loop:
    its TTGIR has async global-to-shared copies. A config the pipeliner gives up on still compiles
    and runs, only slower: triton 3.6.0 did that to the persistent forward when its tile loop and K
    loop were two loops merged by tl.range(flatten=True) (this test failed on 3.6.0 then); the kernel
    now writes the persistent loop flattened by hand, which 3.6.0 and 3.8.0 both pipeline. Not the
    fp16 weight gradient of the NARROW_* lists (at P5 in NCHW, H * W = 950: dy's and x's pixel runs
    start 2-byte aligned; symbolic sizes: no alignment known): neither version pipelines 2-byte
    loads (cp.async copies 4, 8 or 16 bytes); the fp32 ones it does."""
    gemm = [r for r in results if r["kernel"] in ("fwd", "fwd_dx", "grad_weight") and r["num_stages"] >= 2
            and not (r["kernel"] == "grad_weight" and r["narrow"] and r["dtype"] in ("fp16", "bf16"))]
    assert gemm
    unpipelined = [_label(r) for r in gemm if r["async_copies"] == 0]
    assert not unpipelined, f"triton {triton.__version__} left these loads synchronous:\n" + "\n".join(unpipelined)


def test_default_configs_do_not_spill(results):
    """No register spills (cuobjdump's stack size of the cubin is 0) in any config of a default list
    (sm_90 and sm_80; fp16/bf16, fp32 with TF32 and exact fp32) of the forward, dx and weight-gradient
    kernels. CI compiles with triton 3.8.0 and ``make test-compat`` with 3.6.0 (the GPU machines').
    Before the forward's epilogue went by column quarters (_fwd_epilogue_tile) its sm_90 128 x 256 and
    64 x 256 configs spilled (triton 3.8.0: 184-200 B per thread for channels_last, 2184 B for NCHW;
    3.6.0: 8-64 B and 368-424 B); before exact fp32 had lists of its own it took the TF32 lists, whose
    256-column and 4-warp 128 x 128 tiles spilled 160-752 B with an FMA dot; the sm_80 fp16/bf16 and
    TF32 lists had 128 x 256 and 4-warp 128 x 128 tiles that spilled 8-88 B. Not asserted, only
    recorded in the AOT report: the experimental persistent configs (NCHW spills 40-120 B with
    triton 3.8.0). The forward's strided-view and fp32 NCHW variants: the next test."""
    hot = [r for r in results if r["kernel"] in ("fwd", "fwd_dx", "grad_weight") and not r["meta"].get("PERSISTENT")
           and not _index_variant(r) and not _nchw_level(r) and _eager(r)]
    assert {(r["arch"], kind_of(r)) for r in hot} == {(a, k) for a in ARCHS for k in K.KINDS}
    assert all(r["regs"] is not None for r in hot), "cuobjdump (triton/backends/nvidia/bin) gave no resource usage"
    spilled = [f"{_label(r)}: {r['stack']} B stack, {r['regs']} registers" for r in hot if r["stack"]]
    assert not spilled, f"register spills with triton {triton.__version__}:\n" + "\n".join(spilled)


def _tile(r):
    """A GEMM job's tile: (BLOCK_M, BLOCK_N, BLOCK_K), or the weight gradient's (BLOCK_CO, BLOCK_CI,
    BLOCK_M)."""
    m = r["meta"]
    if r["kernel"] == "grad_weight":
        return m["BLOCK_CO"], m["BLOCK_CI"], m["BLOCK_M"]
    return m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_K"]


def _nchw_level(r) -> bool:
    """A job of test_nchw_levels_compile_with_their_pixel_alignment: fp16 NCHW at P4 or P5, or the
    weight gradient in NCHW, from the default lists."""
    return r["trace"] == "eager" and not r["narrow"] and (
        r["sizes"] in ("P4", "P5") or (r["kernel"] == "grad_weight" and r["layout"] == "nchw"))


def _index_variant(r) -> bool:
    """A forward job of the other index paths (default lists): strided x / out (flags), or fp32 NCHW."""
    return r["kernel"] == "fwd" and _eager(r) and not r["narrow"] and (
        bool(r["flags"]) or (r["dtype"] == "fp32" and r["layout"] == "nchw"))


# Spills measured in the forward's other index paths with exact fp32 (the "ieee" lists: TF32 off), per
# config and triton version; every other variant spills nothing.
# Exact fp32 holds its dot operands in registers (no tensor cores), so the per-pixel h, w offsets of
# a strided view or NCHW's A loads push these tiles past 255 registers. The bound is what was
# measured: a spill that grows, or one anywhere else, fails.
KNOWN_VARIANT_SPILLS = {   # (arch, layout, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, strided): bytes of stack
    "3.6": {(90, "channels_last", 128, 128, 32, 8, True): 8},
    "3.8": {(90, "channels_last", 128, 128, 32, 8, True): 8, (80, "nchw", 64, 256, 32, 8, False): 248,
            (80, "nchw", 128, 64, 32, 8, False): 8},
}


def test_forward_index_variants_are_compiled_and_do_not_spill(results):
    """Each default forward config compiled again for the other index paths: x and out strided
    (X_FLAT = O_FLAT = False) in every kind, and fp32 NCHW in both fp32 kinds (fp16 NCHW is among the
    main jobs). They compile within the shared-memory limit (test_shared_memory_within_limits), and
    none spills except the exact-fp32 ones of KNOWN_VARIANT_SPILLS, each at most its measured size."""
    variants = [r for r in results if _index_variant(r)]
    for arch in ARCHS:
        for kind in K.KINDS:
            configs = K.fwd_configs(f"sm{arch}", kind)
            want = {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in configs}
            for strided in (True, False) if kind != "16bit" else (True,):
                got = {(tuple(sorted(r["meta"].items())), r["num_warps"], r["num_stages"]) for r in variants
                       if r["arch"] == arch and kind_of(r) == kind and bool(r["flags"]) == strided}
                assert got == want, f"sm{arch} {kind} strided={strided}: {got} != {want}"
    known = KNOWN_VARIANT_SPILLS.get(".".join(triton.__version__.split(".")[:2]), {})
    bad = []
    for r in variants:
        m = r["meta"]
        key = (r["arch"], r["layout"], m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_K"], r["num_warps"], bool(r["flags"]))
        allowed = known.get(key, 0) if kind_of(r) == "ieee" else 0
        if r["stack"] is None or r["stack"] > allowed:
            bad.append(f"{_label(r)}: {r['stack']} B stack (allowed {allowed}), {r['regs']} registers")
    assert not bad, f"triton {triton.__version__}:\n" + "\n".join(bad)


# Spills of the fp16 NCHW jobs of _nchw_level, per triton version: (arch, kernel, sizes, BLOCK_M or
# BLOCK_CO, BLOCK_N or BLOCK_CI, BLOCK_K or BLOCK_M, num_warps) -> bytes of stack, the most over the
# config's stages. The bound is what was measured: a spill that grows, or one anywhere else, fails.
# P5's forward (PIX_ALIGN 2: 4-byte accesses) spills in one config with either version, and the sm_80
# 4-warp weight-gradient config at P2 and P4 with 3.6.0.
KNOWN_NCHW_SPILLS = {
    "3.6": {(80, "fwd", "P4", 128, 128, 64, 8): 8, (90, "fwd", "P5", 128, 128, 64, 4): 16,
            (80, "grad_weight", "P2", 128, 128, 64, 4): 56, (80, "grad_weight", "P4", 128, 128, 64, 4): 56},
    "3.8": {(90, "fwd", "P5", 128, 128, 64, 4): 16},
}


def test_nchw_levels_compile_with_their_pixel_alignment(results):
    """fp16 NCHW at ResNet-50-FPN's P4 and P5 (H * W = 3800 and 950: no multiple of 16, so triton's
    JIT hints none of the pixel strides): the forward and dx get PIX_ALIGN 8 and 2, the weight
    gradient 8 at P4 (whole 16-byte vectors only; at P2 it is 1: triton hints them; at P5 it takes
    the NARROW_* lists, test_narrow_lists_...). Without PIX_ALIGN, the forward's P4 configs spilled
    160-768 B per thread on sm_90 with triton 3.8.0 (8 of 10 default configs) and 24 B with 3.6.0,
    P5's 200-640 B with 3.8.0 (6 of 10), and the weight gradient's P4 32-384 B; now nothing spills at
    P4 with 3.8.0 (with 3.6.0: one sm_80 forward config 8 B, and the sm_80 4-warp weight-gradient
    config 56 B, as at P2), and the rest is KNOWN_NCHW_SPILLS', each at most its measured size. At P4
    the forward's and the weight gradient's x tiles are pipelined async copies as at P2 (without
    PIX_ALIGN the forward loaded them into registers, 2 bytes at a time). Left as measured: at P5
    the forward pipelines W's tiles only."""
    jobs_ = [r for r in results if _nchw_level(r)]
    want_align = {("fwd", "P4"): 8, ("fwd", "P5"): 2, ("fwd_dx", "P4"): 8, ("fwd_dx", "P5"): 2,
                  ("grad_weight", "P2"): 1, ("grad_weight", "P4"): 8}
    assert {(r["kernel"], r["sizes"], r["arch"]) for r in jobs_} == {k + (a,) for k in want_align for a in ARCHS}
    wrong = [f"{_label(r)}: PIX_ALIGN {r['pix_align']}" for r in jobs_
             if r["pix_align"] != want_align[(r["kernel"], r["sizes"])]]
    assert not wrong, "\n".join(wrong)
    # at P4, as at P2 (where triton hints the strides), the software pipeliner copies x's tiles to
    # shared memory asynchronously as well as W's (without PIX_ALIGN: W's only, x's by register loads)
    p2 = {(r["arch"], r["kernel"], str(r["meta"]), r["num_warps"], r["num_stages"]): r["async_copies"]
          for r in results if _eager(r) and r["layout"] == "nchw" and r["dtype"] == "fp16" and not r["flags"]}
    fewer = [f"{_label(r)}: {r['async_copies']} async copies, at P2 {p2[key]}" for r in jobs_ if r["sizes"] == "P4"
             for key in [(r["arch"], r["kernel"], str(r["meta"]), r["num_warps"], r["num_stages"])]
             if key in p2 and r["async_copies"] != p2[key]]
    assert not fewer and any(r["sizes"] == "P4" and r["kernel"] == "fwd" and (r["arch"], "fwd", str(r["meta"]),
                                                                              r["num_warps"], r["num_stages"]) in p2
                             for r in jobs_), "\n".join(fewer)
    known = KNOWN_NCHW_SPILLS.get(".".join(triton.__version__.split(".")[:2]), {})
    bad = []
    for r in jobs_:
        key = (r["arch"], r["kernel"], r["sizes"], *_tile(r), r["num_warps"])
        if r["stack"] is None or r["stack"] > known.get(key, 0):
            bad.append(f"{key}: {r['stack']} B stack (allowed {known.get(key, 0)}), {r['regs']} registers")
    assert not bad, f"triton {triton.__version__}:\n" + "\n".join(bad)


# Spills of the NARROW_* lists' jobs, per triton version: (arch, kernel, dtype, sizes, trace, tile,
# num_warps, strided) -> bytes of stack. Only as strided views (X_FLAT = O_FLAT = False: per-pixel h, w
# offsets, as in the default lists' strided variants, KNOWN_VARIANT_SPILLS); the rest spills nothing.
KNOWN_NARROW_SPILLS = {
    "3.6": {(80, "fwd", "fp16", "P5sq", "eager", 128, 128, 32, 8, True): 8},
    "3.8": {(90, "fwd", "fp16", "P5sq", "eager", 64, 64, 128, 4, True): 104,
            (80, "fwd", "fp32", "P5sq", "eager", 128, 128, 32, 8, True): 32,   # TF32
            (80, "fwd", "fp32", "P5sq", "eager", 64, 128, 32, 4, True): 72},
}


def test_narrow_lists_compile_where_the_launcher_takes_them_and_do_not_spill(results):
    """The NARROW_* lists (pixels loaded one element at a time, ``narrow_pixel_loads``) are compiled where
    the launcher takes them and only there: every GEMM job's list is the one ``aot.narrow`` (the
    launcher's rule, given the job's sizes, strided-view flags, what its trace leaves unhinted and
    its PIX_ALIGN) gives it, and the narrow jobs are these: P5's weight gradient in every kind; the
    forward at P5 of an 800 x 800 image, H * W = 625, in every kind, also as a strided view, and dx
    there in fp16; the traces' NCHW forward, dx and weight gradient (but the P4 job with only H
    symbolic, PIX_ALIGN 4), all with PIX_ALIGN 1. None spills beyond KNOWN_NARROW_SPILLS (3 strided
    views, 8-104 B). With the default lists instead, those launches spilled: as traced, the fp16
    NCHW forward 200-1312 B per thread in 7 of 10 sm_90 configs with triton 3.8.0 (3.6.0: 8-40 B in
    3 of sm_90 and sm_80), the TF32 one 600-640 B in 2 of 5, exact fp32 24-48 B in every config; the
    weight gradient at P5 up to 1032 B (fp16, 3.6.0, 4 warps), 296-568 B for TF32 and 16-352 B for
    exact fp32."""
    from fused_fpn.kernels import aot
    wrong = []
    for r in results:
        if r["kernel"] != "grad_bias_top":
            _, base, args = aot.job_args(r)
            if r["narrow"] != aot.narrow(base, r["dtype"], args, flat=not r["flags"], unhinted=aot.unhinted_args(r),
                                         align=r["pix_align"]):
                wrong.append(_label(r))
    assert not wrong, "jobs compiled from the other list than the launcher's:\n" + "\n".join(wrong)
    narrow = [r for r in results if r["narrow"]]
    assert {(r["kernel"], r["sizes"], r["trace"]) for r in narrow} == {
        ("grad_weight", "P5", "eager"), ("fwd", "P5sq", "eager"), ("fwd_dx", "P5sq", "eager"),
        ("fwd", "P2", "symbolic"), ("fwd_dx", "P2", "symbolic"), ("grad_weight", "P2", "symbolic"),
        ("fwd", "P2", "symbolic_i64")}
    assert all(r["layout"] == "nchw" and r["pix_align"] == 1 for r in narrow)
    known = KNOWN_NARROW_SPILLS.get(".".join(triton.__version__.split(".")[:2]), {})
    bad = []
    for r in narrow:
        key = (r["arch"], r["kernel"], r["dtype"], r["sizes"], r["trace"], *_tile(r), r["num_warps"], bool(r["flags"]))
        if not r["ok"] or r["stack"] is None or r["stack"] > known.get(key, 0):
            bad.append(f"{key}: {r['error'] or str(r['stack']) + ' B stack'} (allowed {known.get(key, 0)}), "
                       f"{r['regs']} registers")
    assert not bad, f"triton {triton.__version__}:\n" + "\n".join(bad)


@pytest.mark.parametrize("sizes", ["P2", "P4", "P5", "P5sq"])
def test_aot_jobs_pass_the_launchers_arguments(sizes, monkeypatch):
    """The AOT jobs compile what the launchers launch: the forward, dx and weight-gradient arguments
    and PIX_ALIGN of ``lateral_launch`` for ResNet-50-FPN's level in fp16 NCHW (meta tensors, launches
    recorded, not run) equal ``aot.fwd_args`` / ``dx_args`` / ``grad_weight_args`` (all but the values
    the kernels do not specialize on: the scales, the dW split's rows, the pointers' dtypes)."""
    import torch
    from fused_fpn.kernels import aot
    from fused_fpn.kernels import lateral_launch as L
    launches = []
    monkeypatch.setattr(L, "interpreting", lambda: False)
    monkeypatch.setattr(L, "_device_facts", lambda device: ("sm90", 132))
    monkeypatch.setattr(L, "_launch_autotuned",
                        lambda tuner, grid, args, meta, key, binary=False: launches.append((tuner, args, meta)))
    n, cin, h, w = aot.LEVELS[sizes]
    meta_tensor = dict(dtype=torch.float16, device="meta")
    x = torch.empty((n, cin, h, w), **meta_tensor)
    weight, bias = torch.empty((aot.COUT, cin), **meta_tensor), torch.empty((aot.COUT,), **meta_tensor)
    top = None if sizes in aot.NO_TOP else torch.empty((n, aot.COUT, *aot._top_size(h, w)), **meta_tensor)
    out = L.lateral_forward(x, weight, bias, top)
    L.lateral_backward(torch.empty_like(out), x, weight, 0, 0, True, True, False, False)
    assert [tuner.fn for tuner, _, _ in launches] == [K._lateral_fwd_kernel, K._lateral_fwd_kernel,
                                                      K._lateral_grad_weight_kernel]
    expected = [(aot.fwd_args("fp16", "nchw", sizes), "fwd", top is not None),   # (args, base, HAS_TOP)
                (aot.dx_args("fp16", "nchw", sizes), "fwd", False),
                (aot.grad_weight_args("fp16", "nchw", sizes), "grad_weight", None)]
    for (tuner, args, meta), (want, base, has_top) in zip(launches, expected):
        fn = tuner.fn
        got = dict(zip(fn.arg_names, args))
        skip = ("scale_h", "scale_w", "ROWS_PER_SPLIT")
        differ = {k: (got[k], v) for k, v in want.items() if not isinstance(v, str) and k not in skip and got[k] != v}
        assert not differ, f"{fn.__name__} at {sizes}: (launcher, AOT) {differ}"
        assert meta["PIX_ALIGN"] == aot.pix_align(base, "fp16", want)
        assert meta.get("HAS_TOP") == has_top
        assert tuner.fused_fpn_narrow == aot.narrow(base, "fp16", want), f"{fn.__name__} at {sizes}"
    # narrow: the weight gradient at P5 (2-byte runs), everything at P5sq (H * W odd)
    assert [tuner.fused_fpn_narrow for tuner, _, _ in launches] == {
        "P2": [False] * 3, "P4": [False] * 3, "P5": [False, False, True], "P5sq": [True] * 3}[sizes]


def test_persistent_configs_are_compiled_with_the_flattened_loop(results):
    """The experimental persistent forward configs (sm_90 fp16/bf16) are among the compiled ones."""
    persistent = [r for r in results if r["kernel"] in ("fwd", "fwd_dx") and r["meta"].get("PERSISTENT")
                  and not r["meta"]["TMA"]]
    want = len(K.EXPERIMENTAL_FWD_CONFIGS[("sm90", "16bit")]) * 4   # fwd fp16 CL, bf16 CL, fp16 NCHW; dx fp16
    assert len(persistent) == want and all(r["arch"] == 90 for r in persistent)


def test_tma_configs_use_the_copy_engine_where_the_launcher_offers_them(results):
    """The experimental TMA forward configs (``K.TMA_FWD_CONFIGS``) are compiled for sm_90 where the
    launcher offers them and only there: the forward on channels_last x (``aot.tma``, the launcher's
    ``tma_loads`` on the job's arguments), eager at P2 in fp16, bf16 and TF32 (every config; a
    trace is never offered them). Each loads x and W with the copy engine (cp.async.bulk.tensor in the PTX, two
    per pipeline stage: triton 3.6.0 and 3.8.0 both), multiplies with wgmma, and spills nothing;
    no other job issues a TMA copy."""
    from fused_fpn.kernels import aot
    tma = [r for r in results if r["meta"].get("TMA")]
    others = [r for r in results if not r["meta"].get("TMA")]
    for arch in ARCHS:
        for kind, dtypes in (("16bit", ("fp16", "bf16")), ("tf32", ("fp32",)), ("ieee", ("fp32",))):
            want = {(dtype, tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
                    for c in K.TMA_FWD_CONFIGS.get((f"sm{arch}", kind), []) for dtype in dtypes}
            got = {(r["dtype"], tuple(sorted(r["meta"].items())), r["num_warps"], r["num_stages"]) for r in tma
                   if r["arch"] == arch and kind_of(r) == kind and _eager(r)}
            assert got == want, f"sm{arch} {kind}"
    assert all(r["trace"] == "eager" for r in tma), "traces are never offered the TMA configs (tma_loads)"
    wrong = [_label(r) for r in tma if r["kernel"] != "fwd" or r["layout"] != "channels_last" or r["flags"]
             or not aot.tma(r["dtype"], aot.job_args(r)[2])]
    assert not wrong, "TMA configs compiled where the launcher does not offer them:\n" + "\n".join(wrong)
    bad = [f"{_label(r)}: {r['error'] or ''} tma copies {r['tma_copies']}, wgmma {r['wgmma']}, stack {r['stack']}"
           for r in tma if not (r["ok"] and r["wgmma"] and r["tma_copies"] == 2 * r["num_stages"] and r["stack"] == 0)]
    assert not bad, f"triton {triton.__version__}:\n" + "\n".join(bad)
    assert not [_label(r) for r in others if r["tma_copies"]], "only the TMA configs use the copy engine"


def test_resident_weight_configs_keep_the_weight_in_shared_memory(results):
    """The experimental weight-stationary forward configs (``K.RESIDENT_FWD_CONFIGS``) are compiled for
    sm_90 where the launcher offers them (``resident_reduction``: x, or dx's dy, with unit channel
    stride): the forward in fp16 and bf16 channels_last and dx in fp16 channels_last, each config of
    the list. Each keeps its [BLOCK_K, BLOCK_N] weight tile in shared memory for the whole tile loop
    (a ``local_alloc`` of the loaded tile before the loop, in the TTGIR), loads x through the software
    pipeliner (async copies), multiplies with wgmma, fits the shared memory and spills nothing (triton
    3.6.0 and 3.8.0). No other job keeps a tensor in shared memory across its loop."""
    resident = [r for r in results if r["meta"].get("RESIDENT_W")]
    for arch in ARCHS:
        for kind, dtypes in (("16bit", ("fp16", "bf16")), ("tf32", ("fp32",)), ("ieee", ("fp32",))):
            configs = K.RESIDENT_FWD_CONFIGS.get((f"sm{arch}", kind), [])
            want = {(kernel, dtype, tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
                    for c in configs for kernel, dtype in [("fwd", d) for d in dtypes] + [("fwd_dx", dtypes[0])]}
            got = {(r["kernel"], r["dtype"], tuple(sorted(r["meta"].items())), r["num_warps"], r["num_stages"])
                   for r in resident if r["arch"] == arch and kind_of(r) == kind}
            assert got == want, f"sm{arch} {kind}"
    assert resident and all(r["layout"] == "channels_last" and _eager(r) and not r["flags"] for r in resident)
    dtype_name = {"fp16": "f16", "bf16": "bf16"}

    def weight_tile(r):
        return f"{r['meta']['BLOCK_K']}x{r['meta']['BLOCK_N']}x{dtype_name[r['dtype']]}"
    bad = [f"{_label(r)}: {r['error'] or ''} kept {r['kept_in_shared']}, async copies {r['async_copies']}, "
           f"wgmma {r['wgmma']}, stack {r['stack']}, shared {r['shared']}" for r in resident
           if not (r["ok"] and r["kept_in_shared"] == [weight_tile(r)]
                   and r["async_copies"] >= 2 and r["wgmma"] and r["stack"] == 0
                   and r["shared"] <= SHARED_LIMIT[r["arch"]])]
    assert not bad, f"triton {triton.__version__}:\n" + "\n".join(bad)
    kept = [_label(r) for r in results if r["ok"] and r["kept_in_shared"] and not r["meta"].get("RESIDENT_W")]
    assert not kept, "only the weight-stationary configs keep a tile in shared memory across their loop:\n" + \
        "\n".join(kept)


@pytest.mark.parametrize("sizes", ["P2", "P4", "P5", "P5sq"])
def test_the_tma_rule_of_the_aot_jobs_is_the_launchers(sizes):
    """``aot.tma`` (what the AOT jobs take as the launcher's offer) equals ``lateral_launch.tma_loads``
    on tensors of the job's sizes: the forward on channels_last x yes, in NCHW no, dx (W^T) no."""
    import torch
    from fused_fpn.kernels import aot
    from fused_fpn.kernels import lateral_launch as L
    n, cin, h, w = aot.LEVELS[sizes]
    for dtype, name in ((torch.float16, "fp16"), (torch.float32, "fp32")):
        weight = torch.empty((aot.COUT, cin), dtype=dtype)
        for layout in ("channels_last", "nchw"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = torch.empty((n, cin, h, w), dtype=dtype).contiguous(memory_format=fmt)
            dy = torch.empty((n, aot.COUT, h, w), dtype=dtype).contiguous(memory_format=fmt)
            want = layout == "channels_last"
            assert L.tma_loads(x, weight) == aot.tma(name, aot.fwd_args(name, layout, sizes)) == want
            assert L.tma_loads(dy, weight.t()) == aot.tma(name, aot.dx_args(name, layout, sizes)) is False


def test_nearest_scale_in_the_kernel_is_a_correctly_rounded_division(results):
    """The SCALE_IN_KERNEL variant (what a trace with symbolic sizes launches) computes the scale
    float32(in) / float32(out) in the kernel: it must compile to the IEEE division div.rn.f32. A
    plain fp32 ``/`` compiles to an approximate division (div.full.f32) on NVIDIA GPUs, one ulp low
    would gather the row before for exact ratios, and the interpreter (numpy, exact) would not show
    it. The host-scale kernels (eager calls) and the forward as dx divide nothing in fp32."""
    traced = [r for r in results if r["trace"] != "eager" and r["kernel"] in ("fwd", "grad_bias_top")]
    symbolic = [r for r in traced if r["sizes"] != "ones"]
    assert symbolic and all(r["fp32_divisions"] == ["div.rn.f32"] for r in symbolic), \
        sorted({(r["kernel"], r["trace"], tuple(r["fp32_divisions"] or ())) for r in symbolic})
    ones = [r for r in traced if r["sizes"] == "ones"]   # 1 / 1 may fold to a constant
    assert ones and all(set(r["fp32_divisions"]) <= {"div.rn.f32"} for r in ones)
    host = [r for r in results if r["kernel"] != "grad_weight" and (r["trace"] == "eager" or r["kernel"] == "fwd_dx")]
    assert host and all(r["fp32_divisions"] == [] for r in host)


def test_symbolic_size_variants_compile_without_spills(results):
    """The SCALE_IN_KERNEL variant of each forward config (channels_last: the default lists; NCHW: the
    NARROW_* lists, which the launcher takes when no alignment is known; every kind, as the forward and
    as dx; compiled without the divisibility hints a trace cannot give symbolic sizes), the weight
    gradient's NARROW_* list in NCHW, and the bias / top gradient, and both with every size 1 (a 1 x 1
    top, a one-pixel-wide map: sizes of 1 reach the kernels as constexprs, which the interpreter
    cannot show; the first in-kernel scale failed to compile for them) and with int64 sizes and
    strides (inductor passes a symbolic size it cannot bound below 2^31 as i64: the bias / top
    gradient's search did not compile with them, the NCHW forward spilled 672-776 B), and the weight
    gradient with int64 sizes, compile, and spill nothing beyond KNOWN_SYMBOLIC_SPILLS."""
    symbolic = [r for r in results if r["trace"] != "eager"]
    main = [r for r in symbolic if r["kernel"] in ("fwd", "fwd_dx") and r["sizes"] == "P2" and r["trace"] == "symbolic"]
    for arch in ARCHS:
        for kind in K.KINDS:
            for layout in ("channels_last", "nchw"):   # NCHW: the NARROW_* lists (no alignment known)
                want = {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
                        for c in K.fwd_configs(f"sm{arch}", kind, narrow=layout == "nchw")}
                for kernel in ("fwd", "fwd_dx"):
                    got = {(tuple(sorted(r["meta"].items())), r["num_warps"], r["num_stages"]) for r in main
                           if r["kernel"] == kernel and r["arch"] == arch and kind_of(r) == kind
                           and r["layout"] == layout}
                    assert got == want, f"{kernel} symbolic sm{arch} {kind} {layout}"
    assert {(r["kernel"], r["sizes"], r["trace"], r["arch"]) for r in symbolic if r not in main} == {
        (k, s, t, a) for k, s, t in (("grad_bias_top", "P2", "symbolic"), ("fwd", "ones", "symbolic"),
                                     ("grad_bias_top", "ones", "symbolic"), ("fwd", "P2", "symbolic_i64"),
                                     ("grad_weight", "P2", "symbolic_i64"), ("grad_bias_top", "P2", "symbolic_i64"),
                                     ("fwd", "P4", "symbolic"), ("grad_weight", "P2", "symbolic"))
        for a in ARCHS}
    assert all(r["pix_align"] == (4 if r["sizes"] == "P4" else 1) for r in symbolic if r["kernel"] != "grad_bias_top")
    known = KNOWN_SYMBOLIC_SPILLS.get(".".join(triton.__version__.split(".")[:2]), {})
    bad = []
    for r in symbolic:
        m = r["meta"]
        key = (r["arch"], r["dtype"], r["layout"], r["sizes"], m.get("BLOCK_M"), m.get("BLOCK_N"), m.get("BLOCK_K"),
               r["num_warps"])
        if not r["ok"] or r["stack"] is None or r["stack"] > known.get(key, 0):
            bad.append(f"{_label(r)}: {r['error'] or str(r['stack']) + ' B stack'} (allowed {known.get(key, 0)})")
    assert not bad, f"triton {triton.__version__}:\n" + "\n".join(bad)


# Spills measured in the SCALE_IN_KERNEL variant, per config and triton version: (arch, dtype, layout,
# sizes, BLOCK_M, BLOCK_N, BLOCK_K, num_warps) -> bytes of stack, the most over the config's stages and
# its int64 job. The host-scale kernels of the same configs spill nothing
# (test_default_configs_do_not_spill). NCHW as traced takes the NARROW_* lists, which spill nothing;
# with the default lists it spilled 200-1312 B in 7 of 10 sm_90 fp16 configs with triton 3.8.0 (no
# divisibility hint: x's channel-strided rows load one element at a time, an address each).
KNOWN_SYMBOLIC_SPILLS = {
    "3.6": {(80, "fp32", "channels_last", "P2", 128, 64, 32, 8): 16},   # exact fp32 (the "ieee" list)
    "3.8": {(90, "fp32", "channels_last", "P2", 64, 64, 64, 4): 8,   # dx, exact fp32
            # P4 with only H symbolic: PIX_ALIGN 4 (W = 76 static), the default lists
            (90, "fp16", "nchw", "P4", 128, 256, 64, 8): 240, (80, "fp16", "nchw", "P4", 64, 256, 32, 4): 256},
}


def test_sm80_uses_tensor_cores(results):
    fwd = [r for r in results if r["kernel"] in ("fwd", "fwd_dx", "grad_weight") and r["arch"] == 80
           and r["dtype"] in ("fp16", "bf16")]
    assert fwd and all(r["mma"] and not r["wgmma"] for r in fwd)


def test_torch_compile_takes_only_the_outputs_as_written():
    """torch's analysis of each kernel launch's TTIR (what torch.compile runs on a user-defined Triton
    kernel to find the tensors it writes; ``tests/written_arguments.py``, in a subprocess without
    TRITON_INTERPRET) finds the outputs only: the forward's out (also with a persistent config), dx's
    out, dW's partial sums, db's partial sums and dtop. An input taken as written would be copied
    before every compiled call."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "written_arguments.py")
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "fwd": ["out_ptr"], "fwd persistent": ["out_ptr"], "dx": ["out_ptr"],
        "dW": ["part_ptr"], "db_dtop": ["dbpart_ptr", "dtop_ptr"]}


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_binary_launches_call_the_launcher_as_the_jit_does(layout):
    """FUSED_FPN_TRITON_EXPERIMENTAL's binary launches (``lateral_launch._launch_binary``) against the
    installed triton's own JIT (``tests/binary_launch_contract.py``: the JIT compiling for sm_90 with
    a stand-in driver whose binary launchers record their calls, in a subprocess without
    TRITON_INTERPRET): forward, dx, dW and db + dtop, launched a third time without JITFunction.run,
    call each binary's launcher with the arguments, grid, stream, function, metadata and hooks the
    JIT's launches of the first two passes used."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "binary_launch_contract.py")
    proc = subprocess.run([sys.executable, script, layout], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    names = ["_lateral_fwd_kernel", "_lateral_fwd_kernel", "_lateral_grad_weight_kernel",
             "_lateral_grad_bias_top_kernel"]
    assert out["launches"] == [names] * 3
    assert out["jit_runs"] == [4, 4, 0], "the autotuner's pass and the fast path's first launches take the JIT"
    assert out["same"] == out["same_launcher"] == out["first_pass_same"] == [True] * 4

@pytest.mark.parametrize("threads", [2, 1])
def test_a_new_keys_configs_compile_on_threads_before_the_autotuner_runs(tmp_path, threads):
    """``lateral_launch.compile_configs_in_parallel`` (the launcher calls it before the autotuner's
    first run of a key) compiles each config of the forward's autotuner for the launch's own
    specialization on FUSED_FPN_TRITON_COMPILE_THREADS threads (``tests/parallel_compile.py``: the JIT
    with a stand-in sm_90 driver, in a subprocess without TRITON_INTERPRET and with an empty cache).
    With 2 threads: every config's binary is in the JIT's cache, compiled on the pool's threads, two at
    once, and the autotuner's own compiles of the same launch then find all of them (none compiled
    again). With 1: nothing is compiled there (the autotuner compiles as before). Either way a config
    whose compile fails raises nothing there, and its launch gets the error, which the autotuner
    handles as before."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    script = os.path.join(os.path.dirname(__file__), "parallel_compile.py")
    proc = subprocess.run([sys.executable, script, str(threads)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["configs"]) == 3
    assert out["failed"] == ["compiled", "raises CompilationError", "compiled"]
    if threads == 1:
        assert not out["parallel"] and out["compiled"] == [] and out["recompiled"] == 3
        assert out["threads"] == [] and out["finished_with_one_failing"] == 0
        return
    assert out["parallel"] and out["recompiled"] == 0
    key = lambda c: (c["num_warps"], c["num_stages"])  # noqa: E731
    assert sorted(map(key, out["compiled"])) == sorted(map(key, out["configs"]))
    assert all(c["finished"] for c in out["compiled"]), "each a CompiledKernel with a cubin"
    assert out["threads"] == ["fused_fpn-triton-compile"] and out["overlap"] == 2
    assert out["finished_with_one_failing"] == 2
