"""Builds a CPU emulation of fused_fpn's CUDA kernels (see emu_cuda.h) as a torch extension.

The kernel sources of csrc/cuda/ are copied with mechanical edits only: CUDA-only includes
dropped, ``extern __shared__`` / ``__shared__`` arrays pointed at the emulated CTA's shared
buffer, the cp.async helpers replaced by emulated ones, the ``<<<...>>>`` launchers (from the
"// Host launcher of one instantiation" marker on) replaced by emu_main.cpp's mirrors. The host
code of lateral_cuda.cpp runs as written apart from the device guard, the stream, the SM count,
the TF32 flag and the conv2d route of top-less levels (parameters, so the split-K, math and route
decisions can be exercised, and the kernel run where the host would hand the level to conv2d), and
a switch that turns every 16-byte path on regardless of the host's decision (``force_vectors``: a
stand-in for a wrong decision, which the access checks of emu_cuda.h must then catch). Every
16-byte access of the generated copies goes through ``emu::access_ok`` (alignment, and inside the
launch's shared memory or tensors); ``generate`` refuses a source with one it does not map.
Used by tests/test_cuda_build.py on machines without a GPU.

    module = build(build_dir)        # about 30 s on 2 cores
    module.lateral(x, w, bias, top, sm_count, tf32, topless_conv=True, force_vectors=False) -> y
                                     (CPU tensors, CUDA kernel logic; topless_conv=False: never conv2d;
                                     a checked access that fails raises RuntimeError "emulated CUDA kernel: ...")
    module.launches() -> int         emulated kernel launches so far
    module.grad(dy, top_h, top_w) -> (db, dtop)
    module.probe(kind, t, offset)    one emulated access of `kind` ("cp.async source", "cp.async
                                     destination", "16-byte store", "ldmatrix row", "wmma load", or
                                     "element read": a byte read that only AddressSanitizer checks) at
                                     byte `offset` of tensor t (global) or of a 1 KiB shared memory
    build(build_dir, sanitize=True)  the same under AddressSanitizer (asan_preload() in LD_PRELOAD)
"""
from __future__ import annotations

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)  # csrc/cuda

# Emulated cp.async (deferred copies, retired by cp.async.wait_group (EMU_DEFER=1) or immediate),
# ldmatrix and mma.sync (per lane, through the warp's exchange buffer of emu_cuda.h).
_DEVICE_PRIMITIVES_EMU = """struct EmuCopy {
  void* dst;
  const void* src;
  bool valid;
};
inline thread_local std::vector<EmuCopy> emu_pending;
inline thread_local std::vector<std::vector<EmuCopy>> emu_groups;
inline void emu_do(const EmuCopy& c) {
  if (c.valid) {
    std::memcpy(c.dst, c.src, 16);
  } else {
    std::memset(c.dst, 0, 16);
  }
}
inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  if (!emu::access_ok(smem, 16, 16, emu::Space::Shared, "cp.async destination")) return;
  if (valid && !emu::access_ok(gmem, 16, 16, emu::Space::Global, "cp.async source")) return;
#if EMU_DEFER
  emu_pending.push_back({smem, gmem, valid});
#else
  emu_do({smem, gmem, valid});
#endif
}
inline void cp_async_commit() {
  emu_groups.push_back(std::move(emu_pending));
  emu_pending.clear();
}
template <int N>
inline void cp_async_wait() {
  while (emu_groups.size() > static_cast<size_t>(N)) {
    for (auto& c : emu_groups.front()) emu_do(c);
    emu_groups.erase(emu_groups.begin());
  }
}

// Emulated warp-wide primitives (layouts: cuda_utils.cuh, from the PTX ISA). Each call publishes
// this lane's operands in the warp's exchange buffer (emu_cuda.h), waits for the whole warp, then
// computes what the hardware hands this lane.
inline uint16_t emu_b16(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline uint32_t emu_pack(uint16_t lo, uint16_t hi) { return lo | (static_cast<uint32_t>(hi) << 16); }
inline int emu_publish() {  // the exchange set of this call; flips for the next one
  const int p = emu::warp_parity;
  emu::warp_parity ^= 1;
  return p;
}
inline void emu_ldmatrix_x4(uint32_t (&r)[4], const void* smem_row, bool trans) {
  static const unsigned char zero_row[16] = {};  // what a lane whose row address is refused publishes
  emu::WarpShare& w = *emu::warp_share;
  const int p = emu_publish(), l = emu::lane_id, g = l / 4, q = l % 4;
  w.addr[p][l] = emu::access_ok(smem_row, 16, 16, emu::Space::Shared, "ldmatrix row")
                     ? static_cast<const unsigned char*>(smem_row) : zero_row;
  emu::warp_bar->arrive_and_wait();
  for (int i = 0; i < 4; ++i) {
    if (trans) {  // rows 2q and 2q + 1 of matrix i, column g
      r[i] = emu_pack(emu_b16(w.addr[p][8 * i + 2 * q] + 2 * g), emu_b16(w.addr[p][8 * i + 2 * q + 1] + 2 * g));
    } else {      // row g of matrix i, columns 2q and 2q + 1
      const unsigned char* row = w.addr[p][8 * i + g];
      r[i] = emu_pack(emu_b16(row + 4 * q), emu_b16(row + 4 * q + 2));
    }
  }
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) { emu_ldmatrix_x4(r, smem_row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) { emu_ldmatrix_x4(r, smem_row, true); }
inline uint32_t f32_to_tf32(uint32_t bits) { return bits; }  // TF32 rounding is not emulated
// mma.sync m16n8kK: publishes this lane's a[4], b[2], then computes its 4 outputs (rows g, g + 8;
// columns 2q, 2q + 1) from A(regs, row, k) and B(regs, k, n), which read the warp's registers.
template <int K, typename AElem, typename BElem>
inline void emu_mma_16x8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], AElem A, BElem B) {
  emu::WarpShare& w = *emu::warp_share;
  const int p = emu_publish(), l = emu::lane_id, g = l / 4, q = l % 4;
  for (int i = 0; i < 4; ++i) w.regs[p][l][i] = a[i];
  w.regs[p][l][4] = b[0];
  w.regs[p][l][5] = b[1];
  emu::warp_bar->arrive_and_wait();
  for (int v = 0; v < 4; ++v) {
    const int row = g + 8 * (v / 2), col = 2 * q + v % 2;
    float s = d[v];
    for (int k = 0; k < K; ++k) s += A(w.regs[p], row, k) * B(w.regs[p], k, col);
    d[v] = s;
  }
}
using EmuRegs = const uint32_t (*)[6];
inline float emu_bf16_half(uint32_t v, int hi) {  // the bf16 element in the low (hi = 0) or high half
  const uint32_t bits = hi ? (v & 0xFFFF0000u) : (v << 16);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
// bf16: A[row][k] is in lane (row % 8) * 4 + (k % 8) / 2, register row / 8 + 2 (k / 8), half k % 2;
// B[k][n] in lane n * 4 + (k % 8) / 2, register 4 + k / 8, half k % 2.
inline void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu_mma_16x8<16>(
      d, a, b,
      [](EmuRegs r, int row, int k) {
        return emu_bf16_half(r[(row % 8) * 4 + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2);
      },
      [](EmuRegs r, int k, int n) { return emu_bf16_half(r[n * 4 + (k % 8) / 2][4 + k / 8], k % 2); });
}
// TF32: A[row][k] is in lane (row % 8) * 4 + k % 4, register row / 8 + 2 (k / 4); B[k][n] in lane
// n * 4 + k % 4, register 4 + k / 4.
inline float emu_f32(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void mma_tf32_1688(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu_mma_16x8<8>(
      d, a, b, [](EmuRegs r, int row, int k) { return emu_f32(r[(row % 8) * 4 + k % 4][row / 8 + 2 * (k / 4)]); },
      [](EmuRegs r, int k, int n) { return emu_f32(r[n * 4 + k % 4][4 + k / 4]); });
}

"""


def _checked_copy16(dst: str, src: str, what: str, space: str = "Any") -> str:
    """A 16-byte copy from src to dst, done only if emu::access_ok allows the device-memory side
    (src for a load, dst for a store: the one that is not the register pack)."""
    mem = src if dst.startswith("&") else dst
    return (f"if (emu::access_ok({mem}, 16, 16, emu::Space::{space}, \"{what}\")) "
            f"std::memcpy({dst}, {src}, 16);")


def _read(*parts: str) -> str:
    with open(os.path.join(SRC, *parts)) as f:
        return f.read()


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"emulation: the CUDA sources changed, cannot find {old!r}"
    return text.replace(old, new)


def _cut(text: str, marker: str) -> str:
    assert marker in text, f"emulation: the CUDA sources changed, cannot find {marker!r}"
    return text[:text.index(marker)]


def _drop_includes(text: str, *headers: str) -> str:
    for h in headers:
        text = text.replace(f"#include <{h}>\n", "")
    return text


def generate(out: str) -> None:
    """Writes the emulation copies of the CUDA sources into ``out``."""
    os.makedirs(out, exist_ok=True)
    files = {}

    u = _read("cuda_utils.cuh")
    i = u.index("// 16-byte global -> shared asynchronous copy")
    j = u.index("}  // namespace cuda")
    u = u[:i] + _DEVICE_PRIMITIVES_EMU + u[j:]
    u = _replace(u, "pack.raw = *reinterpret_cast<const uint4*>(ptr);", _checked_copy16("&pack.raw", "ptr", "16-byte load"))
    u = _replace(u, "*reinterpret_cast<uint4*>(ptr) = pack.raw;", _checked_copy16("ptr", "&pack.raw", "16-byte store"))
    files["cuda_utils.cuh"] = _replace(u, "#include <cuda_runtime.h>", '#include "emu_cuda.h"')

    f = _cut(_read("lateral_fwd.cuh"), "// Host launcher of one instantiation")
    f = _drop_includes(f, "c10/cuda/CUDAException.h", "c10/util/Exception.h", "mma.h")
    f = _replace(f, '#include "../nearest.h"', '#include "nearest.h"')
    f = _replace(f, "extern __shared__ __align__(128) unsigned char smem[];", "unsigned char* smem = emu::smem_ptr;")
    f = _replace(f, "tops[u].raw = *reinterpret_cast<const uint4*>(tp);",
                 _checked_copy16("&tops[u].raw", "tp", "16-byte top load", "Global"))
    files["lateral_fwd.cuh"] = f + "\n}  // namespace cuda\n}  // namespace fused_fpn\n"

    b = _cut(_read("lateral_bwd.cu"), "template <typename T, typename Layout, bool kHasTop>\nvoid launch_grad_bias_top")
    b = _drop_includes(b, "c10/cuda/CUDAException.h", "c10/util/Exception.h")
    b = _replace(b, '#include "../nearest.h"', '#include "nearest.h"')
    b = _replace(b, "__shared__ float red[kClGroups][kClLanes];",
                 "float(&red)[kClGroups][kClLanes] = *reinterpret_cast<float(*)[kClGroups][kClLanes]>(emu::smem_ptr);")
    b = _replace(b, "__shared__ float red[kNchwThreads];", "float* red = reinterpret_cast<float*>(emu::smem_ptr);")
    assert "__shared__" not in b, "emulation: a new __shared__ array needs a mapping here"
    files["lateral_bwd.cuh"] = b + "\n}  // namespace cuda\n}  // namespace fused_fpn\n"

    h = _drop_includes(_read("lateral_cuda.cpp"), "c10/cuda/CUDAException.h", "c10/cuda/CUDAGuard.h",
                       "c10/cuda/CUDAStream.h", "torch/library.h")
    h = _replace(h, '#include "../nearest.h"', '#include "nearest.h"')
    h = _replace(h, '#include "../lateral_common.h"', '#include "lateral_common.h"')
    h = re.sub(r"c10::cuda::CUDAGuard guard\([^;]*\);", "", h)
    h = _replace(h, "x.is_cuda()", "true")
    h = _replace(h, "grad_out.is_cuda()", "true")
    h = _replace(h, "c10::cuda::getCurrentCUDAStream()", "static_cast<cudaStream_t>(nullptr)")
    h = _replace(h, "multiprocessor_count(x.get_device())", "emu::sm_count")
    h = _replace(h, "if (conv_allows_tf32()) {", "if (emu::tf32) {")
    h = _replace(h, "&& runs_as_convolution(x, top)) {", "&& emu::topless_conv && runs_as_convolution(x, top)) {")
    h = _replace(h, "\n  // Split-K when the output tiles",  # after the host's 16-byte path decisions
                 "\n  if (emu::force_vectors) p.vec_x = p.vec_w = p.vec_out = p.vec_top = true;"
                 "\n  // Split-K when the output tiles")
    i = h.index("int multiprocessor_count(int device) {")
    j = h.index("// Whether fp32 convolutions may use TF32")
    h = h[:i] + h[j:]
    i = h.index("TORCH_LIBRARY_IMPL(fused_fpn, CUDA, m)")
    j = h.index("}", i)
    files["lateral_cuda_host.cpp"] = h[:i] + h[j + 1:]

    files["lateral_cuda.h"] = _read("lateral_cuda.h")
    files["nearest.h"] = _read("..", "nearest.h")
    files["lateral_common.h"] = _read("..", "lateral_common.h")
    with open(os.path.join(HERE, "emu_cuda.h")) as fh:
        files["emu_cuda.h"] = fh.read()
    for name, text in files.items():
        # every 16-byte access goes through emu::access_ok: a new one must be mapped above
        assert not re.search(r"reinterpret_cast<(const )?u?int4\s*\*>", text), \
            f"emulation: {name} has a 16-byte access the emulation does not check; map it in emulate.py"
        path = os.path.join(out, name)
        if os.path.exists(path):
            with open(path) as fh:
                if fh.read() == text:
                    continue  # unchanged: keep its time stamp, so a build in the same folder is reused
        with open(path, "w") as fh:
            fh.write(text)


def asan_preload():
    """The libraries to LD_PRELOAD into a python that loads a ``build(..., sanitize=True)`` module:
    gcc's AddressSanitizer runtime (it must come first), then libstdc++ (python does not link it, and
    without it ASan's interceptor of C++ throws finds no real __cxa_throw and aborts at torch's first
    exception). None when gcc has no ASan runtime."""
    import subprocess

    paths = []
    for compiler, lib in (("gcc", "libasan.so"), ("g++", "libstdc++.so")):
        try:
            path = subprocess.run([compiler, f"-print-file-name={lib}"], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
        path = os.path.realpath(path)
        if not (os.path.isabs(path) and os.path.exists(path)):
            return None
        paths.append(path)
    return paths


def build(build_dir: str, sanitize: bool = False):
    """Generates the sources into ``build_dir`` and builds / loads the emulator module. sanitize:
    built with AddressSanitizer (-fsanitize=address), so every access of the emulated kernels, the
    element ones too, is checked against the bounds of its allocation; the module then loads only
    into a process started with ``asan_preload()`` in LD_PRELOAD."""
    from torch.utils.cpp_extension import load

    gen = os.path.join(build_dir, "gen")
    generate(gen)
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    asan = ["-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize else []
    return load("fused_fpn_cuda_emu" + ("_asan" if sanitize else ""), sources=[os.path.join(HERE, "emu_main.cpp")],
                build_directory=build_dir, extra_include_paths=[gen, os.path.join(cuda_home, "include")],
                extra_cflags=["-O1" if sanitize else "-O2", "-std=c++20", "-w", "-DEMU_DEFER=1"] + asan,
                extra_ldflags=asan, verbose=False)
