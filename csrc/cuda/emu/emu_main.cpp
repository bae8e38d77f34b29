// Launchers of the emulated kernels (mirroring lateral_fwd.cuh / lateral_bwd.cu) and the real host
// code of lateral_cuda.cpp, built by csrc/cuda/emu/emulate.py from generated copies of the sources.
#include <torch/extension.h>

#include "lateral_bwd.cuh"
#include "lateral_fwd.cuh"

namespace fused_fpn {
namespace cuda {

template <typename T, typename Math, typename Layout, bool B, bool TP>
void emu_fwd(const LateralFwdParams& p) {
  using Cfg = FwdTile<T, Math, Layout>;
  const int64_t M = p.N * p.H * p.W;
  TORCH_CHECK(p.k_split >= 1 && (p.k_split == 1 || p.partial != nullptr), "split");
  const int64_t blocks = ((M + Cfg::BM - 1) / Cfg::BM) * ((p.Cout + Cfg::BN - 1) / Cfg::BN) * p.k_split;
  const int64_t es = sizeof(T);
  emu::GlobalsScope tensors({
      emu::strided_range(p.x, es, {{p.N, p.sx0}, {p.Cin, p.sx1}, {p.H, p.sx2}, {p.W, p.sx3}}, "x"),
      emu::dense_range(p.w, es * p.Cout * p.Cin, "weight"),
      emu::dense_range(p.bias, es * p.Cout, "bias"),
      emu::strided_range(p.top, es, {{p.N, p.st0}, {p.Cout, p.st1}, {p.Ht, p.st2}, {p.Wt, p.st3}}, "top"),
      emu::dense_range(p.out, es * M * p.Cout, "out"),
      emu::dense_range(p.partial, 4 * p.k_split * M * p.Cout, "split-K partial sums"),
  });
  emu::launch(blocks, 1, 1, Cfg::kThreads, 1, Cfg::kSmemBytes, [&] { lateral_fwd_kernel<T, Math, Layout, B, TP>(p); });
  if (p.k_split > 1) {
    const int64_t total = M * p.Cout;
    const int64_t eblocks = std::min<int64_t>((total + 255) / 256, int64_t{1} << 20);
    emu::launch(eblocks, 1, 1, 256, 1, 0, [&] { lateral_splitk_epilogue_kernel<T, Layout, B, TP>(p); });
  }
}

template <typename T, typename Math>
void emu_dispatch(const LateralFwdParams& p, bool cl) {
  const bool hb = p.bias != nullptr, ht = p.top != nullptr;
#define EMU_CASE(L, B, TP) \
  if (hb == B && ht == TP) return emu_fwd<T, Math, L, B, TP>(p);
  if (cl) {
    EMU_CASE(ChannelsLast, true, true)
    EMU_CASE(ChannelsLast, true, false)
    EMU_CASE(ChannelsLast, false, true)
    EMU_CASE(ChannelsLast, false, false)
  } else {
    EMU_CASE(Nchw, true, true)
    EMU_CASE(Nchw, true, false)
    EMU_CASE(Nchw, false, true)
    EMU_CASE(Nchw, false, false)
  }
#undef EMU_CASE
}

void lateral_fwd_f16(const LateralFwdParams& p, bool cl, cudaStream_t) { emu_dispatch<__half, MathWmma>(p, cl); }
void lateral_fwd_bf16(const LateralFwdParams& p, bool cl, cudaStream_t) {
  emu_dispatch<__nv_bfloat16, MathWmma>(p, cl);
}
void lateral_fwd_f32_tf32(const LateralFwdParams& p, bool cl, cudaStream_t) { emu_dispatch<float, MathTf32>(p, cl); }
void lateral_fwd_f32_ffma(const LateralFwdParams& p, bool cl, cudaStream_t) { emu_dispatch<float, MathFfma>(p, cl); }

template <typename T, typename Layout, bool kHasTop>
void emu_bwd(const GradBiasTopParams& p) {
  constexpr bool kChannelsLast = std::is_same<Layout, ChannelsLast>::value;
  const auto blocks = static_cast<unsigned>(grad_bias_top_blocks(p.N, p.C, p.R, kChannelsLast));
  const int64_t es = sizeof(T);
  emu::GlobalsScope tensors({
      emu::strided_range(p.dy, es, {{p.N, p.s0}, {p.C, p.s1}, {p.H, p.s2}, {p.W, p.s3}}, "dy"),
      emu::dense_range(p.db, es * p.C, "db"),
      emu::strided_range(p.dtop, es, {{p.N, p.d0}, {p.C, p.d1}, {p.Ht, p.d2}, {p.Wt, p.d3}}, "dtop"),
      emu::dense_range(p.partial, 4 * p.N * p.R * p.C, "db partial sums"),
  });
  if constexpr (kChannelsLast) {
    emu::launch(blocks, 1, 1, kClLanes, kClGroups, 0, [&] { grad_bias_top_cl_kernel<T, kHasTop>(p); });
  } else {
    emu::launch(blocks, 1, 1, kNchwThreads, 1, 0, [&] { grad_bias_top_nchw_kernel<T, kHasTop>(p); });
  }
  emu::launch((p.C + 255) / 256, 1, 1, 256, 1, 0,
              [&] { grad_bias_reduce_kernel<T>(p.partial, p.N * p.R, p.C, static_cast<T*>(p.db)); });
}
template <typename T>
void emu_bwd_dispatch(const GradBiasTopParams& p, bool cl) {
  const bool ht = p.dtop != nullptr;
  if (cl) {
    if (ht) return emu_bwd<T, ChannelsLast, true>(p);
    return emu_bwd<T, ChannelsLast, false>(p);
  }
  if (ht) return emu_bwd<T, Nchw, true>(p);
  return emu_bwd<T, Nchw, false>(p);
}
void lateral_grad_bias_top(const GradBiasTopParams& p, int dtype, bool cl, cudaStream_t) {
  if (dtype == 0) return emu_bwd_dispatch<__half>(p, cl);
  if (dtype == 1) return emu_bwd_dispatch<__nv_bfloat16>(p, cl);
  return emu_bwd_dispatch<float>(p, cl);
}

}  // namespace cuda
}  // namespace fused_fpn

#include "lateral_cuda_host.cpp"

at::Tensor emu_lateral(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       const c10::optional<at::Tensor>& t, int64_t sms, bool tf32, bool topless_conv,
                       bool force_vectors) {
  emu::sm_count = static_cast<int>(sms);
  emu::tf32 = tf32;
  emu::topless_conv = topless_conv;
  emu::force_vectors = force_vectors;
  return fused_fpn::lateral_cuda(x, w, b, t);
}

// One access of `kind` by an emulated warp (lane 0 at the probed address, the other lanes at valid
// ones) at byte `offset` of t (the launch's only tensor) or, for shared-memory kinds, of a 1 KiB
// dynamic shared memory: how the tests show that the access checks fault.
void emu_probe(const std::string& kind, const at::Tensor& t, int64_t offset) {
  using namespace fused_fpn::cuda;
  static const char* kinds[] = {"cp.async source", "cp.async destination", "16-byte store", "ldmatrix row", "wmma load",
                                "element read"};
  TORCH_CHECK(std::find(std::begin(kinds), std::end(kinds), kind) != std::end(kinds), "probe: unknown kind ", kind);
  const auto* base = static_cast<const unsigned char*>(t.const_data_ptr());
  emu::GlobalsScope tensors({emu::dense_range(base, t.nbytes(), "t")});
  emu::launch(1, 1, 1, 32, 1, 1024, [&] {
    unsigned char* smem = emu::smem_ptr;
    const int64_t off = emu::lane_id == 0 ? offset : 0;
    if (kind == "cp.async source") {
      cp_async_16(smem, base + off, true);
      cp_async_commit();
      cp_async_wait<0>();
    } else if (kind == "cp.async destination") {
      cp_async_16(smem + off, base, true);
      cp_async_commit();
      cp_async_wait<0>();
    } else if (kind == "16-byte store") {
      float v[16 / sizeof(float)] = {};
      store16_from_float<float>(reinterpret_cast<float*>(const_cast<unsigned char*>(base) + off), v);
    } else if (kind == "ldmatrix row") {
      uint32_t r[4];
      ldmatrix_x4(r, smem + off + 16 * emu::lane_id);
    } else if (kind == "wmma load") {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> f;
      nvcuda::wmma::load_matrix_sync(f, reinterpret_cast<const __half*>(smem + offset), 16);
    } else if (kind == "element read" && emu::lane_id == 0) {  // unchecked, as the kernels' element accesses
      static_cast<void>(*reinterpret_cast<const volatile unsigned char*>(base + offset));
    }
  });
}
std::tuple<at::Tensor, at::Tensor> emu_grad(const at::Tensor& dy, int64_t th, int64_t tw) {
  return fused_fpn::lateral_grad_bias_top_cuda(dy, th, tw);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lateral", &emu_lateral, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("t"), py::arg("sms"),
        py::arg("tf32"), py::arg("topless_conv") = true, py::arg("force_vectors") = false);
  m.def("probe", &emu_probe);
  m.def("launches", [] { return emu::launches; });
  m.def("grad", &emu_grad);
}
