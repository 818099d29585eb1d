// Host-side declarations of the kernel launchers in csrc/*.cu.
//
// The .cu files see only raw pointers, sizes and a cudaStream_t: they include no
// torch headers, so nvcc compiles them quickly.  csrc/clip_fast.cpp does every
// tensor-level job (checks, allocation, .contiguous(), the cuBLAS GEMMs via at::mm)
// and calls these.  Every launcher returns the cudaError_t of its launch(es).
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace clip_fast {

// Which tile-product path a launch uses.  Chosen at run time from the dtype and the
// float32 matmul setting, and turned into a template parameter inside the .cu files.
enum class InputKind : int {
  kHalf = 0,         // float16 inputs, WMMA m16n16k16, fp32 accumulation
  kBFloat16 = 1,     // bfloat16 inputs, WMMA m16n16k16, fp32 accumulation
  kFloat32Tf32 = 2,  // float32 inputs rounded to tf32, WMMA m16n16k8 (allow_tf32)
  kFloat32Exact = 3, // float32 inputs, plain FMA on CUDA cores (exact fp32)
};

// Forward: the row and column log-sum-exp and the diagonal of S = scale*img@txt.T+bias.
// img (M, D) and txt (K, D) are contiguous, M, K >= 1.  Workspace (float32, device):
//   norm_ws: K + 1 floats (txt row norms, then max_i |img_i|), written here;
//   col_sum: K floats, written here (zeroed inside).
// bias may be nullptr.  Writes lse_row (M), lse_col (K), diag (min(M, K)).
cudaError_t launch_lse_forward(InputKind kind, const void* img, const void* txt, int64_t M,
                               int64_t K, int64_t D, const float* scale, const float* bias,
                               float* lse_row, float* lse_col, float* diag, float* norm_ws,
                               float* col_sum, cudaStream_t stream);

// Backward, one strip of rows [row_begin, row_end): writes
//   W[i - row_begin, j] = G_ij / omega   (input dtype, row-major, leading dimension K)
// for every i in the strip and every j < K, and adds sum_ij G_ij * <img_i, txt_j> over
// the strip into *d_scale (float32, device).  lse_row / lse_col may be nullptr when the
// matching coefficient is zero.
cudaError_t launch_grad_strip(InputKind kind, const void* img, const void* txt, int64_t M,
                              int64_t K, int64_t D, int64_t row_begin, int64_t row_end,
                              const float* scale, const float* bias, const float* lse_row,
                              const float* lse_col, float coef_row, float coef_col,
                              float coef_diag, float inv_omega, void* W, float* d_scale,
                              cudaStream_t stream);

// Tile sizes, shared with the host code that sizes the backward strips.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

}  // namespace clip_fast
