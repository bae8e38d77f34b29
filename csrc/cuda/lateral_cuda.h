// Shared declarations of the CUDA backend of fused_fpn (csrc/cuda/).
//
// The kernels live in .cu files that include only CUDA and c10 headers (fast to compile); the
// host code in lateral_cuda.cpp (ATen, argument checks, allocation, dispatch registration) talks
// to them through the plain parameter structs and per-dtype entry points declared here.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fused_fpn {
namespace cuda {

// ---- compile-time switches (template parameters of the kernels) ----------------------------
// Layout of x as seen by the forward kernel's shared-memory tiles. Any strides are read
// correctly by both; the tag only decides which dimension is contiguous in shared memory (and
// so which global loads/stores coalesce and vectorize):
//   ChannelsLast: x read as X[m, k] (pixel-major, channels contiguous), output [M, Cout] row-major.
//   Nchw:         x read as X[k, m] (channel-major, pixels contiguous), output [N, Cout, H*W].
struct ChannelsLast {};
struct Nchw {};

// Arithmetic of the forward GEMM:
//   MathWmma: tensor cores for fp16 (WMMA m16n16k16) and bf16 (ldmatrix + mma.sync m16n8k16), fp32
//             accumulation.
//   MathTf32: tensor cores (ldmatrix + mma.sync m16n8k8, TF32 inputs) for fp32 when cudnn.allow_tf32
//             is on.
//   MathFfma: exact IEEE fp32 FMA on the CUDA cores for fp32 when allow_tf32 is off.
struct MathWmma {};
struct MathTf32 {};
struct MathFfma {};

// ---- forward: y = x . W^T + b + U(top) --------------------------------------------------------
struct LateralFwdParams {
  const void* x;     // [N, Cin, H, W], strides sx0..sx3 (elements)
  const void* w;     // [Cout, Cin], contiguous
  const void* bias;  // [Cout], contiguous, or nullptr
  const void* top;   // [N, Cout, Ht, Wt], strides st0..st3, or nullptr
  void* out;         // [N, Cout, H, W]: channels_last-contiguous (ChannelsLast) or contiguous (Nchw)
  int64_t N, Cin, H, W, Cout;
  int64_t sx0, sx1, sx2, sx3;
  int64_t Ht, Wt;
  int64_t st0, st1, st2, st3;
  float scale_h, scale_w;  // nearest_scale(Ht, H), nearest_scale(Wt, W) (float32, ATen's rule)
  // 16-byte vector paths, decided on the host from strides, sizes and pointer alignment:
  bool vec_x;    // x tiles load with 16-byte cp.async (else element loads)
  bool vec_w;    // weight tiles load with 16-byte cp.async
  bool vec_out;  // output stores (and channels_last top loads when vec_top) are 16-byte
  bool vec_top;  // top gathers are 16-byte (channels_last only: top.stride(1) == 1, aligned)
  // Split-K (deterministic, for grids too small to fill the GPU with a deep K, e.g. a P5-sized
  // level with a top map or strided x: few pixels, Cin = 2048): k_split CTAs per output tile each
  // sum k_tiles_per_split K tiles into partial (fp32 [k_split, M, Cout] for ChannelsLast, [k_split,
  // Cout, M] for Nchw); a second kernel adds the k_split partial sums in order, the bias and the
  // gathered top. k_split == 1: one pass, the epilogue is fused into the GEMM kernel (partial
  // unused).
  int64_t k_split;
  int64_t k_tiles_per_split;
  float* partial;
};

// One entry point per (dtype, math): each switches on layout / has-bias / has-top and launches
// the matching explicit instantiation on `stream`.
void lateral_fwd_f16(const LateralFwdParams& p, bool channels_last, cudaStream_t stream);
void lateral_fwd_bf16(const LateralFwdParams& p, bool channels_last, cudaStream_t stream);
void lateral_fwd_f32_tf32(const LateralFwdParams& p, bool channels_last, cudaStream_t stream);
void lateral_fwd_f32_ffma(const LateralFwdParams& p, bool channels_last, cudaStream_t stream);

// ---- backward: db = sum dy, dtop = U^T(dy) in one pass over dy ------------------------------
struct GradBiasTopParams {
  const void* dy;  // [N, C, H, W], strides s0..s3
  void* db;        // [C], contiguous
  void* dtop;      // [N, C, Ht, Wt], strides d0..d3, or nullptr when there is no top
  float* partial;  // [N * R, C] fp32 workspace: per-row-group partial sums of dy (for db)
  int64_t N, C, H, W;
  int64_t s0, s1, s2, s3;
  int64_t Ht, Wt;  // 0, 0: no top
  int64_t d0, d1, d2, d3;
  float scale_h, scale_w;  // nearest_scale(Ht, H), nearest_scale(Wt, W)
  int64_t R;               // row groups per image: Ht with a top, else ceil(H / rows_per_group)
  int64_t rows_per_group;  // rows of dy per group when there is no top
};

// Blocks of the db + dtop kernel (lateral_bwd.cu), one per work item in a 1-D grid: (row group,
// image, block of kGradTopChannelsPerBlock channels) for channels_last dy, (row group, channel, image)
// otherwise; R row groups per image. At most kMaxGridBlocks (the grid's x limit), checked by the host
// code; a count past it comes back as kMaxGridBlocks + 1 (no int64 overflow for any sizes).
constexpr int64_t kGradTopChannelsPerBlock = 32;
constexpr int64_t kMaxGridBlocks = 0x7fffffff;
inline int64_t grad_bias_top_blocks(int64_t N, int64_t C, int64_t R, bool channels_last) {
  const int64_t channel_blocks = channels_last ? (C + kGradTopChannelsPerBlock - 1) / kGradTopChannelsPerBlock : C;
  if (R == 0 || N == 0 || channel_blocks == 0) return 0;
  if (R > kMaxGridBlocks / N || R * N > kMaxGridBlocks / channel_blocks) return kMaxGridBlocks + 1;
  return R * N * channel_blocks;
}

// dtype: 0 = float16, 1 = bfloat16, 2 = float32.
void lateral_grad_bias_top(const GradBiasTopParams& p, int dtype, bool channels_last, cudaStream_t stream);

// Tile shape of the forward kernel (the host counts output tiles with BM, BN to decide split-K).
constexpr int kFwdBM = 128;           // pixels per CTA
constexpr int kFwdBN = 128;           // output channels per CTA
constexpr int kFwdThreadsMma = 128;   // tensor-core paths: 4 warps, 2 x 2 warp tiles of 64 x 64
constexpr int kFwdThreadsFfma = 256;  // exact fp32: 16 x 16 threads of 8 x 8 outputs
constexpr int kFwdStages = 3;         // cp.async pipeline depth
constexpr int kEpiChunks = 1024;      // 16-byte output chunks per CTA whose top gathers are in flight together

}  // namespace cuda
}  // namespace fused_fpn
