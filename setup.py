"""Builds ONE extension, ``fused_fpn._C``, from ``csrc/``.

* The C++ CPU kernels (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) are always built.
* The CUDA kernels (``csrc/cuda/*.cu``, ``csrc/cuda/*.cpp``) are built too whenever nvcc and a
  CUDA-enabled torch are present. When ``CUDA_HOME`` is unset and ``/usr/local/cuda/bin/nvcc``
  exists, ``CUDA_HOME`` is set to ``/usr/local/cuda`` (torch otherwise guesses /usr/local).

Environment switches (all optional):
  FUSED_FPN_SKIP_CUDA_BUILD=1   never build the CUDA kernels
  FUSED_FPN_FORCE_CUDA=1        fail the build if the CUDA kernels cannot be built
  FUSED_FPN_CUDA_ARCHS="80;90"  compute capabilities to build machine code for ("90a" allowed)
  MAX_JOBS=N                    parallel compile jobs (default: number of CPUs)

Without torch's build helpers or nvcc this never crashes: it falls back to the CPU-only
extension, and ``import fused_fpn`` works even if ``_C`` is missing entirely.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return cuda_home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # before torch.utils.cpp_extension reads it
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        os.environ["CUDA_HOME"] = home
        return home
    return None


def _cuda_arch_flags(archs):
    flags = []
    for arch in archs:
        arch = arch.strip()
        if not arch:
            continue
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def build_config():
    """Resolve what to build; returns (ext_modules, cmdclass, summary lines)."""
    summary = []
    cuda_home = None if _flag("FUSED_FPN_SKIP_CUDA_BUILD") else _find_nvcc()
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - any failure means: no extension
        summary.append(f"torch build helpers unavailable ({exc!r}): building no extension")
        return [], {}, summary

    cpu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
                       + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
                        + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    want_cuda = (not _flag("FUSED_FPN_SKIP_CUDA_BUILD")) and cuda_home is not None \
        and torch.version.cuda is not None and bool(cuda_sources)
    reasons = []
    if _flag("FUSED_FPN_SKIP_CUDA_BUILD"):
        reasons.append("FUSED_FPN_SKIP_CUDA_BUILD is set")
    elif cuda_home is None:
        reasons.append("nvcc not found")
    if torch.version.cuda is None:
        reasons.append("torch is a CPU-only build")
    if not cuda_sources:
        reasons.append("no sources in csrc/cuda")
    if _flag("FUSED_FPN_FORCE_CUDA") and not want_cuda:
        raise RuntimeError("FUSED_FPN_FORCE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))

    archs = os.environ.get("FUSED_FPN_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    cxx_flags = ["-O3", "-DNDEBUG"]
    define_macros = []
    if want_cuda:
        define_macros.append(("FUSED_FPN_WITH_CUDA", "1"))
        nvcc_flags = ["-O3", "-DNDEBUG", "-lineinfo", "--expt-relaxed-constexpr",
                      "-Xptxas=-v", "-std=c++17"] + _cuda_arch_flags(archs)
        ext = cpp_extension.CUDAExtension(
            "fused_fpn._C", cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DFUSED_FPN_WITH_CUDA=1"], "nvcc": nvcc_flags},
            define_macros=define_macros,
        )
        summary.append(f"CUDA: yes (CUDA_HOME={cuda_home}, torch CUDA {torch.version.cuda}, archs {archs})")
    else:
        ext = cpp_extension.CppExtension("fused_fpn._C", cpu_sources, extra_compile_args={"cxx": cxx_flags})
        summary.append("CUDA: no (" + "; ".join(reasons) + ")")
    summary.insert(0, f"torch {torch.__version__}; sources: {len(cpu_sources)} C++, "
                      f"{len(cuda_sources) if want_cuda else 0} CUDA")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    summary.append(f"MAX_JOBS={os.environ['MAX_JOBS']}")
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None
                                                                        or _has_ninja_module())}
    return [ext], cmdclass, summary


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


ext_modules, cmdclass, summary = build_config()
for line in summary:
    print(f"[fused_fpn setup] {line}", file=sys.stderr)

setup(
    packages=["fused_fpn", "fused_fpn.backends", "fused_fpn.kernels"],
    package_dir={"fused_fpn": "fused_fpn", "fused_fpn.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
