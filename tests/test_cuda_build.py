"""Proof without a GPU that the CUDA backend is built, loadable and complete.

Runs on every CI machine (no GPU, nvcc + a CUDA torch present):
* ``fused_fpn._C`` was compiled with the CUDA kernels (``_C.with_cuda == 1``), imports without a
  GPU (checked in a subprocess with no visible device), and registers both ops for the CUDA key;
* ``cuobjdump`` (shipped in Triton's wheel) finds sm_80 and sm_90 ELF in ``_C`` and sm_90 (and
  sm_80) machine code for EVERY kernel instantiation, named by its demangled template arguments;
* the ptxas resource report saved by the build (``build/ptxas/*.ptxas.log``, see setup.py) shows
  0 bytes of spill stores and loads for every kernel, the forward GEMM kernels included.

* the kernels' logic (tiling, tails, layouts, 16-byte paths, the cp.async pipeline's waits and
  barriers, split-K, the db/dtop kernels) and the real host code of lateral_cuda.cpp run on the
  CPU through csrc/cuda/emu (a thread-per-CUDA-thread emulation) against fused_fpn.reference;
  every 16-byte access, ldmatrix row and WMMA tile the emulation runs is checked for the alignment
  the hardware requires and for staying inside the launch's shared memory and tensors (a GPU faults
  on the first: "misaligned address"), and a compact matrix runs again under AddressSanitizer,
  which checks the element accesses too against each tensor's allocation.

Skipped (with the reason) only where the CUDA kernels cannot be built: no nvcc, a CPU-only torch,
or a build that was explicitly told to skip them (FUSED_FPN_SKIP_CUDA_BUILD=1).
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

import fused_fpn
from fused_fpn import _extension
from cuda_emu_testing import (check_emulated_forward, cuda_build_skip_reason, emu_input, emulate_module, nvcc_home,
                              one_element_off)

REPO = Path(__file__).resolve().parents[1]
OPS = ("fused_fpn::lateral", "fused_fpn::lateral_grad_bias_top")
# The archs the build targets: setup.py's default "80;90" (the CI contract), or FUSED_FPN_CUDA_ARCHS
# when the build (and so this test run) was given another list, e.g. "90a".
ARCHS = tuple(f"sm_{a.strip()}" for a in os.environ.get("FUSED_FPN_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
              if a.strip())
SM90 = next((a for a in ARCHS if a.startswith("sm_90")), None)

# Every kernel instantiation the CUDA sources must contain (demangled names, without arguments).
NS = "fused_fpn::cuda::"
FWD_TYPES = (("__half", "MathWmma"), ("__nv_bfloat16", "MathWmma"), ("float", "MathTf32"), ("float", "MathFfma"))
FWD_KERNELS = [
    f"{NS}lateral_fwd_kernel<{t}, {NS}{math}, {NS}{layout}, {b}, {top}>"
    for (t, math), layout, b, top in itertools.product(FWD_TYPES, ("ChannelsLast", "Nchw"), ("true", "false"),
                                                       ("true", "false"))
]
SPLITK_KERNELS = [
    f"{NS}lateral_splitk_epilogue_kernel<{t}, {NS}{layout}, {b}, {top}>"
    for t, layout, b, top in itertools.product(("__half", "__nv_bfloat16", "float"), ("ChannelsLast", "Nchw"),
                                               ("true", "false"), ("true", "false"))
]
BWD_TYPES = ("__half", "__nv_bfloat16", "float")
BWD_KERNELS = [
    f"{NS}{kind}<{t}, {top}>" for kind, t, top in itertools.product(
        ("grad_bias_top_cl_kernel", "grad_bias_top_nchw_kernel"), BWD_TYPES, ("true", "false"))
] + [f"{NS}grad_bias_reduce_kernel<{t}>" for t in BWD_TYPES]
ALL_KERNELS = FWD_KERNELS + SPLITK_KERNELS + BWD_KERNELS


_SKIP = cuda_build_skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


def _so_path() -> str:
    assert _extension.extension_loaded(), f"fused_fpn._C is not loaded: {_extension.extension_error()}"
    return _extension._C.__file__


def _cuobjdump() -> str:
    candidates = []
    try:
        import triton
        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    home = nvcc_home()
    if home:
        candidates.append(Path(home) / "bin" / "cuobjdump")
    found = shutil.which("cuobjdump")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.exists() and os.access(c, os.X_OK):
            return str(c)
    pytest.fail(f"cuobjdump not found (looked in {[str(c) for c in candidates]}); Triton's wheel ships one")


def _demangle(names: List[str]) -> Dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    assert cxxfilt is not None, "c++filt (binutils, needed by the C++ build anyway) is required to read kernel names"
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def _strip_args(demangled: str) -> str:
    """'void ns::k<T, a>(ns::Params)' -> 'ns::k<T, a>' (the template-id: no return type, no parameters)."""
    if demangled.startswith("void "):
        demangled = demangled[len("void "):]
    return demangled[:demangled.rfind("(")] if demangled.endswith(")") else demangled


def _run(args: List[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def resource_usage() -> Dict[str, Dict[str, str]]:
    """arch -> {kernel template-id: resource line} from ``cuobjdump --dump-resource-usage`` of _C."""
    text = _run([_cuobjdump(), "--dump-resource-usage", _so_path()])
    per_arch: Dict[str, Dict[str, str]] = {}
    arch = None
    mangled: List[Tuple[str, str, str]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m and arch is not None:
            usage = lines[i + 1].strip() if i + 1 < len(lines) else ""
            mangled.append((arch, m.group(1), usage))
    names = _demangle(sorted({name for _, name, _ in mangled}))
    for a, name, usage in mangled:
        per_arch.setdefault(a, {})[_strip_args(names[name])] = usage
    return per_arch


def test_extension_built_with_cuda():
    assert _extension.extension_loaded(), f"fused_fpn._C failed to load: {_extension.extension_error()}"
    assert _extension._C.with_cuda == 1, "fused_fpn._C was built without the CUDA kernels although nvcc and a CUDA " \
                                         "torch are present (see the '[fused_fpn setup]' lines of the build log)"
    assert _extension.cuda_built()


def test_import_without_gpu_and_ops_registered_for_cuda():
    """A fresh interpreter that sees no GPU imports the CUDA-built _C and finds both CUDA kernels."""
    code = (
        "import torch, fused_fpn\n"
        "from fused_fpn import _extension\n"
        "assert not torch.cuda.is_available()\n"
        "assert _extension.extension_loaded(), _extension.extension_error()\n"
        "assert _extension._C.with_cuda == 1\n"
        f"for op in {OPS!r}:\n"
        "    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, 'CUDA'), op\n"
        "    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, 'CPU'), op\n"
        "print('ok')\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(REPO))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("op", OPS)
def test_op_registered_for_cuda_key(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


def test_cuda_backend_reports_why_unavailable_without_gpu():
    from fused_fpn.backends import cuda as cuda_backend
    reason = cuda_backend.unavailable_reason()
    if torch.cuda.is_available():
        assert reason is None
    else:
        assert reason == "no CUDA device is available"


def test_elf_for_sm80_and_sm90():
    text = _run([_cuobjdump(), "--list-elf", _so_path()])
    for arch in ARCHS:
        assert re.search(rf"\b{arch}\b", text), f"no {arch} ELF in _C:\n{text}"


@pytest.mark.parametrize("arch", ARCHS)
def test_machine_code_for_every_kernel_instantiation(resource_usage, arch):
    assert arch in resource_usage, f"no {arch} cubin in _C; found {sorted(resource_usage)}"
    have = resource_usage[arch]
    missing = [k for k in ALL_KERNELS if k not in have]
    assert not missing, f"{arch}: no machine code for {missing}; {len(have)} kernels found, e.g. {sorted(have)[:3]}"
    for k in ALL_KERNELS:
        regs = re.search(r"REG:(\d+)", have[k])
        assert regs and int(regs.group(1)) > 0, f"{arch} {k}: unexpected resource usage {have[k]!r}"


def test_archs_include_sm90():
    assert SM90 is not None, f"the CUDA build must target sm_90 (H100); FUSED_FPN_CUDA_ARCHS gives {ARCHS}"


@pytest.fixture(scope="module")
def sass() -> Dict[str, Dict[str, str]]:
    """arch -> {kernel template-id: SASS body} from ``cuobjdump --dump-sass`` of _C."""
    per_arch: Dict[str, Dict[str, str]] = {}
    for arch in ARCHS:
        text = _run([_cuobjdump(), "--dump-sass", "--gpu-architecture", arch, _so_path()])
        blocks = re.split(r"\n\s*Function : ", text)[1:]
        mangled = [b.split("\n", 1)[0].strip() for b in blocks]
        names = _demangle(mangled)
        per_arch[arch] = {_strip_args(names[m]): b for m, b in zip(mangled, blocks)}
    return per_arch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", FWD_KERNELS, ids=lambda k: k[len(NS):].replace(NS, ""))
def test_sass_of_every_forward_kernel_has_vector_memory_and_tensor_core_instructions(sass, arch, kernel):
    """#4's forward kernel in machine code, for every instantiation and arch:
    * x and W tiles come through cp.async 16 bytes at a time (LDGSTS ... .128);
    * the epilogue stores the output with 16-byte stores (STG.E.128);
    * fp16 / bf16 / TF32 run on tensor cores (HMMA), the exact-fp32 path on FFMA;
    * channels_last with a top gathers it with 16-byte loads (LDG.E.128): channels are contiguous."""
    body = sass[arch].get(kernel)
    assert body is not None, f"{kernel} not found in the {arch} SASS"
    assert re.search(r"LDGSTS\.E[.\w]*\.128\b", body), "no 16-byte cp.async (LDGSTS .128) of the x / W tiles"
    assert re.search(r"STG\.E\.128\b", body), "no 16-byte store (STG.E.128) in the epilogue"
    if "MathFfma" in kernel:
        assert "FFMA" in body and "HMMA" not in body, "the exact-fp32 path must use FFMA, not tensor cores"
    else:
        assert "HMMA" in body, "no tensor-core (HMMA) instruction"
    if "ChannelsLast" in kernel and kernel.endswith(", true>"):   # has_top
        assert re.search(r"LDG\.E[.\w]*\.128\b", body), "the channels_last top is not gathered 16 bytes at a time"


_TENSOR_CORE_PREFIXES = tuple(f"{NS}lateral_fwd_kernel<{t}, {NS}{m}" for t, m in
                              (("__half", "MathWmma"), ("__nv_bfloat16", "MathWmma"), ("float", "MathTf32")))
TENSOR_CORE_FWD_KERNELS = [k for k in FWD_KERNELS if k.startswith(_TENSOR_CORE_PREFIXES)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", TENSOR_CORE_FWD_KERNELS, ids=lambda k: k[len(NS):].replace(NS, ""))
def test_sass_of_tensor_core_forward_kernels_feeds_4_mmas_per_fragment_load(sass, arch, kernel):
    """The fp16 / bf16 / TF32 K loop: each warp's 64 x 64 tile takes 8 shared-memory fragment loads
    (LDSM) per K slice (TF32 NCHW: 4, its A operands are 32-bit shared loads) and issues 32
    HMMA.16816 (HMMA.1688 for TF32) with them: at least 4 per load. The earlier 32 x 64 warp tiles
    issued 16 per 6 loads (2.7), one B fragment live at a time, and their tensor-core ops waited on
    each load. The K loop is unrolled once, so whole-kernel counts are the loop's. No generic loads
    (LD.E) or register transposes (MOVM) either: nvcuda::wmma loaded bf16 and TF32 fragments that
    way in nvcc 13.0 (64 LD.E, no LDSM, and for bf16 NCHW 32 MOVM per kernel; this test failed for
    both), so those two now get their LDSM from the kernel's own ldmatrix."""
    body = sass[arch].get(kernel)
    assert body is not None, f"{kernel} not found in the {arch} SASS"
    hmma = len(re.findall(r"\bHMMA\.(?:16816|1688)\.F32", body))
    ldsm = len(re.findall(r"\bLDSM\.", body))
    assert ldsm > 0 and hmma >= 4 * ldsm, \
        f"{hmma} HMMA.16816 / 1688 for {ldsm} LDSM: fewer than 4 tensor-core ops per fragment load"
    slow = re.findall(r"\b(?:LD\.E|MOVM)\S*", body)
    assert not slow, f"fragment loads through generic loads / register transposes: {sorted(set(slow))}"
    kind = {"__nv_bfloat16": r"16816\.F32\.BF16", "float": r"1688\.F32\.TF32"}.get(kernel.split("<")[1].split(",")[0])
    if kind is not None:
        assert hmma == len(re.findall(rf"\bHMMA\.{kind}\b", body)), f"MMAs of another type than {kind}"


def _ptxas_log_dir() -> Path:
    return Path(os.environ.get("FUSED_FPN_PTXAS_LOG_DIR") or REPO / "build" / "ptxas")


def _ptxas_report() -> Dict[Tuple[str, str], Tuple[int, int]]:
    """(arch, kernel template-id) -> (spill store bytes, spill load bytes) from the saved report."""
    log_dir = _ptxas_log_dir()
    logs = sorted(log_dir.glob("*.ptxas.log"))
    assert logs, f"no ptxas report in {log_dir}: the build should save one per CUDA source (see setup.py)"
    entries: List[Tuple[str, str, int, int]] = []
    for log in logs:
        arch = name = None
        for line in log.read_text().splitlines():
            m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
            if m:
                name, arch = m.group(1), m.group(2)
                continue
            m = re.search(r"Function properties for (\S+)", line)
            if m:
                name = m.group(1)
                continue
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and name is not None and arch is not None:
                entries.append((arch, name, int(m.group(1)), int(m.group(2))))
    names = _demangle(sorted({e[1] for e in entries}))
    return {(a, _strip_args(names[n])): (st, ld) for a, n, st, ld in entries}


def test_ptxas_report_covers_every_kernel():
    report = _ptxas_report()
    for arch in ARCHS:
        missing = [k for k in ALL_KERNELS if (arch, k) not in report]
        assert not missing, f"the ptxas report in {_ptxas_log_dir()} lacks {arch} entries for {missing}"


@pytest.mark.parametrize("kernels", [FWD_KERNELS + SPLITK_KERNELS, BWD_KERNELS], ids=["forward", "backward"])
def test_no_register_spills(kernels):
    report = _ptxas_report()
    spills = {f"{arch} {k}": report[(arch, k)] for arch in ARCHS for k in kernels
              if (arch, k) in report and report[(arch, k)] != (0, 0)}
    assert not spills, f"register spills (store bytes, load bytes): {spills}"
    assert all((arch, k) in report for arch in ARCHS for k in kernels)


def test_backend_listed_with_reason_matches_device():
    names = fused_fpn.available_backends()
    assert ("cuda" in names) == torch.cuda.is_available()


# ---- the CUDA kernels' logic, emulated on the CPU (csrc/cuda/emu) --------------------------------

@pytest.fixture(scope="module")
def emu(cuda_emu):
    return cuda_emu


def _emu_case(size, dtype, layout, has_bias, has_top, top_layout=None, seed=0):
    n, cin, cout, h, w, th, tw = size
    gen = torch.Generator().manual_seed(seed)
    x = emu_input((n, cin, h, w), dtype, layout, gen)
    weight = (torch.randn((cout, cin), generator=gen) / cin ** 0.5).to(dtype)
    bias = torch.randn((cout,), generator=gen).to(dtype) if has_bias else None
    top = emu_input((n, cout, th, tw), dtype, top_layout or layout, gen) if has_top else None
    return x, weight, bias, top


def _check_emulated_lateral(emu, size, dtype, layout, has_bias, has_top, sm_count=132, tf32=False, top_layout=None):
    x, weight, bias, top = _emu_case(size, dtype, layout, has_bias, has_top, top_layout)
    assert x.dtype == dtype and weight.shape[0] == size[2]
    check_emulated_forward(emu, x, weight, bias, top, sm_count, tf32)


EMU_SIZES = [  # (N, Cin, Cout, H, W, Ht, Wt): odd channels, tails of every tile dim, up/down-sampling
    (2, 3, 17, 7, 9, 4, 5),
    (1, 129, 129, 13, 11, 7, 6),
    (1, 64, 32, 10, 12, 5, 6),
    (1, 40, 24, 3, 50, 2, 25),
    (2, 32, 136, 10, 7, 5, 4),
    (0, 16, 8, 4, 4, 2, 2),
]
EMU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (dtype, tf32): every math path of the forward kernel: WMMA fp16, PTX bf16, exact fp32 FMA, PTX TF32
# (whose rounding to TF32 is not emulated: fp32 tolerances apply)
EMU_MATHS = [pytest.param(torch.float16, False, id="fp16"), pytest.param(torch.bfloat16, False, id="bf16"),
             pytest.param(torch.float32, False, id="fp32"), pytest.param(torch.float32, True, id="fp32_tf32")]


@pytest.mark.parametrize("has_bias,has_top", [(True, True), (False, False)], ids=["bias-top", "plain"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig", "cl_misaligned"])
@pytest.mark.parametrize("dtype,tf32", EMU_MATHS)
@pytest.mark.parametrize("size", EMU_SIZES, ids=["x".join(map(str, s)) for s in EMU_SIZES])
def test_emulated_forward(emu, size, dtype, tf32, layout, has_bias, has_top):
    _check_emulated_lateral(emu, size, dtype, layout, has_bias, has_top, tf32=tf32)


@pytest.mark.parametrize("has_bias,has_top", [(True, False), (False, True)], ids=["bias", "top"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_emulated_forward_bias_or_top_only(emu, layout, has_bias, has_top):
    _check_emulated_lateral(emu, (2, 32, 40, 6, 9, 3, 5), torch.float16, layout, has_bias, has_top)


@pytest.mark.parametrize("top_layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_emulated_forward_top_in_other_layouts(emu, layout, top_layout):
    _check_emulated_lateral(emu, (1, 64, 16, 8, 8, 4, 4), torch.float16, layout, True, True, top_layout=top_layout)


@pytest.mark.parametrize("has_bias,has_top", [(True, True), (False, False)], ids=["bias-top", "plain"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("dtype,tf32", EMU_MATHS)
@pytest.mark.parametrize("size", [(1, 300, 20, 5, 7, 3, 4), (2, 520, 136, 9, 8, 5, 4)], ids=["1tile", "4tiles"])
def test_emulated_split_k(emu, size, dtype, tf32, layout, has_bias, has_top):
    """A large SM count makes the host choose split-K for these deep-K, few-pixel shapes."""
    _check_emulated_lateral(emu, size, dtype, layout, has_bias, has_top, sm_count=1000, tf32=tf32)


@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=["fp16", "bf16", "fp32"])
def test_emulated_topless_level_route(emu, dtype):
    """The host code hands a level without a top map to ATen's conv2d when x is dense NCHW or
    channels_last (no kernel launch; the same numbers as eager conv2d, bit for bit, in x's format),
    and runs the kernel for every other case: a top map, strided x, Cin == 0."""
    import torch.nn.functional as F
    from fused_fpn._layout import output_memory_format

    size = (2, 40, 24, 5, 7, 3, 4)
    routes = [("nchw", False, True), ("channels_last", False, True), ("noncontig", False, False),
              ("cl_misaligned", False, False), ("nchw", True, False), ("channels_last", True, False)]
    for layout, has_top, conv in routes:
        for has_bias in (True, False):
            x, weight, bias, top = _emu_case(size, dtype, layout, has_bias, has_top)
            before = emu.launches()
            out = emu.lateral(x, weight, bias, top, 132, False)
            assert (emu.launches() == before) == conv, (layout, has_top, "route")
            assert out.is_contiguous(memory_format=output_memory_format(x))
            if conv:
                eager = F.conv2d(x, weight[:, :, None, None], bias)
                assert torch.equal(out, eager), (layout, has_bias)
            else:
                check_emulated_forward(emu, x, weight, bias, top)
    x = emu_input((2, 40, 5, 14), dtype, "channels_last", torch.Generator().manual_seed(1))[..., ::2]
    assert x.stride(1) == 1 and not x.is_contiguous(memory_format=torch.channels_last)  # the kernel's 16-byte path
    weight, bias = _emu_case(size, dtype, "nchw", True, False)[1:3]
    before = emu.launches()
    check_emulated_forward(emu, x, weight, bias, None)
    assert emu.launches() > before
    x, weight, bias, _ = _emu_case((1, 0, 8, 3, 3, 1, 1), dtype, "nchw", True, False)
    before = emu.launches()
    out = emu.lateral(x, weight, bias, None, 132, False)
    assert emu.launches() > before and torch.equal(out, bias[None, :, None, None].expand(1, 8, 3, 3))


@pytest.mark.parametrize("has_top", [False, True], ids=["conv2d-route", "kernel"])
def test_emulated_host_code_under_autocast_computes_in_x_dtype(emu, has_top):
    """Under torch.autocast (here the CPU's: the emulation runs on CPU tensors) the host code's own
    conv2d must not be cast: the output stays in x's dtype, the same values as without autocast."""
    x, weight, bias, top = _emu_case((2, 40, 24, 5, 7, 3, 4), torch.float32, "channels_last", True, has_top)
    plain = emu.lateral(x, weight, bias, top, 132, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = emu.lateral(x, weight, bias, top, 132, False)
    assert out.dtype == torch.float32 and torch.equal(out, plain)


# the last two: no dy pixels, with a top that has none along one axis (the forward accepts it then)
EMU_GRAD_SIZES = [(2, 17, 7, 9, 4, 5), (1, 3, 5, 6, 10, 13), (1, 40, 3, 50, 2, 25), (2, 9, 16, 16, 8, 8),
                  (2, 5, 9, 10, 0, 0), (2, 5, 0, 10, 0, 4), (1, 4, 6, 0, 3, 0)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("size", EMU_GRAD_SIZES, ids=["x".join(map(str, s)) for s in EMU_GRAD_SIZES])
def test_emulated_grad_bias_top(emu, size, dtype, layout):
    from fused_fpn._layout import output_memory_format
    from fused_fpn.reference import lateral_grad_bias_top_reference
    from fpn_testing import TOLERANCES

    n, c, h, w, th, tw = size
    dy = emu_input((n, c, h, w), dtype, layout, torch.Generator().manual_seed(5))
    db, dtop = emu.grad(dy, th, tw)
    rdb, rdtop = lateral_grad_bias_top_reference(dy.double(), th, tw)
    assert dtop.shape == (n, c, th, tw) and dtop.is_contiguous(memory_format=output_memory_format(dy))
    assert not torch.isnan(db).any() and not torch.isnan(dtop).any()
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(db.double(), rdb, atol=atol, rtol=rtol)
    torch.testing.assert_close(dtop.double(), rdtop, atol=atol, rtol=rtol)


# The emulation checks every 16-byte access, ldmatrix row and WMMA tile (emu_cuda.h, emu::access_ok):
# aligned as the hardware requires, and inside the launch's shared memory or one of its tensors. So
# every emulated test above also shows the kernels make no access a GPU faults on ("misaligned
# address") or that touches memory outside the tensors. These two show the checks can fail.
PROBES = [  # kind, a valid byte offset, a misaligned one, one outside, the message of "outside"
    ("cp.async source", 16, 8, 256, "not inside any tensor of the launch"),
    ("cp.async destination", 1008, 8, 1024, "outside the launch's 1024 bytes of shared memory"),
    ("16-byte store", 240, 4, 256, "not inside any tensor of the launch"),
    ("ldmatrix row", 496, 2, 1024, "outside the launch's 1024 bytes of shared memory"),
    ("wmma load", 512, 16, 768, "outside the launch's 1024 bytes of shared memory"),
]


@pytest.mark.parametrize("kind,valid,misaligned,outside,outside_msg", PROBES, ids=[p[0] for p in PROBES])
def test_emulator_faults_misaligned_and_out_of_range_accesses(emu, kind, valid, misaligned, outside, outside_msg):
    """One access by an emulated warp at a byte offset of a 256-byte tensor (global kinds) or of 1 KiB
    of shared memory: allowed where the hardware allows it, a RuntimeError naming the access otherwise."""
    t = torch.zeros(64, dtype=torch.float32)
    assert t.data_ptr() % 16 == 0
    emu.probe(kind, t, valid)
    with pytest.raises(RuntimeError, match=rf"emulated CUDA kernel: {re.escape(kind.replace('wmma load', 'wmma::load_matrix_sync'))}: misaligned address"):
        emu.probe(kind, t, misaligned)
    with pytest.raises(RuntimeError, match=re.escape(outside_msg)):
        emu.probe(kind, t, outside)
    emu.probe(kind, t, valid)  # a fault does not stick to later launches


@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=["fp16", "bf16", "fp32"])
def test_emulated_16_byte_paths_the_host_refuses_would_fault(emu, dtype):
    """The host code turns a 16-byte path on only where the pointer and strides allow it
    (lateral_cuda.cpp). With its decisions overridden to "on" (force_vectors), inputs it refuses them
    for make the emulated kernel fault, naming the access: x, the weight or top one element off a
    16-byte boundary (strides that allow 16-byte accesses), Cin odd (x's pixels and the weight's
    rows), Cout odd (channels_last output and top rows). With the host's own decisions the same
    inputs run and match the reference; where it allows every path, the override changes nothing,
    bit for bit."""
    size = (2, 40, 24, 6, 8, 3, 4)
    x, weight, bias, top = _emu_case(size, dtype, "channels_last", True, True)
    assert torch.equal(emu.lateral(x, weight, bias, top, 132, False, force_vectors=True),
                       emu.lateral(x, weight, bias, top, 132, False))
    nchw = _emu_case(size, dtype, "nchw", True, True)
    cases = [("x off 16 bytes", (one_element_off(x), weight, bias, top), "cp.async source"),
             ("NCHW x off 16 bytes", (one_element_off(nchw[0]),) + nchw[1:], "cp.async source"),
             ("weight off 16 bytes", (x, one_element_off(weight), bias, top), "cp.async source"),
             ("top off 16 bytes", (x, weight, bias, one_element_off(top)), "16-byte top load"),
             ("Cin odd", _emu_case((2, 41, 24, 6, 8, 3, 4), dtype, "channels_last", True, True), "cp.async source"),
             ("Cout odd", _emu_case((2, 40, 17, 6, 8, 3, 4), dtype, "channels_last", True, True), "16-byte")]
    for case, args, access in cases:
        check_emulated_forward(emu, *args)  # the host's own decisions: no fault
        with pytest.raises(RuntimeError, match=rf"emulated CUDA kernel: {access}.*misaligned address"):
            emu.lateral(*args, 132, False, force_vectors=True)


# AddressSanitizer over the emulated kernels: the element (scalar) accesses, which emu::access_ok does
# not see, checked against the bounds of every tensor's allocation (tests/cuda_asan_run.py).
@pytest.fixture(scope="module")
def asan_run(tmp_path_factory):
    """Runs tests/cuda_asan_run.py in a python with the ASan runtime preloaded (one build, reused)."""
    preload = emulate_module().asan_preload()
    if preload is None:
        pytest.skip("gcc has no AddressSanitizer runtime (gcc -print-file-name=libasan.so)")
    build_dir = str(tmp_path_factory.mktemp("cuda_emu_asan"))
    env = dict(os.environ, LD_PRELOAD=" ".join(preload + [os.environ.get("LD_PRELOAD", "")]).strip(),
               ASAN_OPTIONS="detect_leaks=0")  # python keeps its objects at exit: not a kernel's leak

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "tests" / "cuda_asan_run.py"), build_dir, mode], env=env,
                              capture_output=True, text=True, timeout=1800)
    return run


def test_address_sanitizer_catches_an_element_read_past_a_tensor(asan_run):
    """The canary: in the sanitized emulator an unchecked byte read at the last byte of a tensor runs,
    one byte further aborts with ASan's report (so the run below would catch a kernel doing it)."""
    proc = asan_run("canary")
    assert "last byte read" in proc.stdout, proc.stderr[-4000:]
    assert "not caught" not in proc.stdout, "the emulator was not built with AddressSanitizer"
    assert proc.returncode != 0 and "ERROR: AddressSanitizer: heap-buffer-overflow" in proc.stderr, proc.stderr[-4000:]


def test_emulated_kernels_stay_inside_their_tensors_under_address_sanitizer(asan_run):
    """Every forward route (element and 16-byte paths, strided and misaligned views, up- and
    downsampling, split-K with its workspace, all four maths) and the db + dtop kernels in every
    layout, under ASan: no access outside a tensor's allocation, and the values match the reference."""
    import cuda_asan_run

    proc = asan_run("cases")
    assert proc.returncode == 0 and "AddressSanitizer" not in proc.stderr, proc.stderr[-6000:]
    ran = re.search(r"^ran (\d+) cases$", proc.stdout, re.M)
    assert ran and int(ran.group(1)) == len(cuda_asan_run.forward_cases()) + len(cuda_asan_run.grad_cases()), \
        proc.stdout[-2000:]
