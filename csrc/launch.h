// Host-side declarations of the kernel launchers in csrc/*.cu.
//
// The .cu files see only raw pointers, sizes and a cudaStream_t: they include no
// torch headers, so nvcc compiles them quickly.  csrc/clip_op.cpp does every
// tensor-level job (checks, allocation, .contiguous(), the cuBLAS GEMMs via at::mm)
// and calls these.  Every launcher returns the cudaError_t of its launch(es).
#pragma once

#include <algorithm>
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

// Tile sizes, shared with the host code that sizes the workspaces.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

// How many column ranges the forward grid splits K into.  The forward grid is
// (row blocks) x (splits): with a small M (e.g. a distributed block, M = local batch,
// K = global batch) one CTA per 64 rows would leave most SMs idle, so the columns are
// split until there are about 4 CTAs per SM; each split keeps a partial online row
// log-sum-exp that a small kernel merges.  Always >= 1 and <= the number of column tiles.
inline int64_t forward_column_splits(int64_t M, int64_t K, int num_sms) {
  const int64_t row_blocks = (M + kBlockM - 1) / kBlockM;
  const int64_t col_tiles = (K + kBlockN - 1) / kBlockN;
  const int64_t target = 4 * static_cast<int64_t>(std::max(num_sms, 1));
  int64_t splits = (target + row_blocks - 1) / row_blocks;
  splits = std::min<int64_t>(std::min<int64_t>(splits, col_tiles), 65535);
  return std::max<int64_t>(splits, 1);
}

// Forward: the off-diagonal row and column log-sum-exp and the diagonal of
// S = scale*img@txt.T+bias, all in log2 units (the host adds the diagonal back in float64).
// img (M, D) and txt (K, D) are contiguous, M, K >= 1.  Workspace (float32, device):
//   norm_ws: K + 1 floats (txt row norms, then max_i |img_i|), written here;
//   col_sum, col_max: K floats each, written here (set to 0 and -inf inside).
// Outputs (float32, device):
//   row_part: 2 * splits * M floats, splits = forward_column_splits(M, K, num_sms): the
//             partial row maxima (splits x M), then the partial sums exp2(S2 - max); the
//             caller fills them with (-inf, 0) first, so splits left empty merge as nothing;
//   col_off2: K doubles, the off-diagonal column lse;
//   diag2:    min(M, K) floats, S2_ii.
// bias may be nullptr.
cudaError_t launch_lse_forward(InputKind kind, const void* img, const void* txt, int64_t M,
                               int64_t K, int64_t D, const float* scale, const float* bias,
                               float* row_part, double* col_off2, float* diag2, float* norm_ws,
                               float* col_sum, float* col_max, int num_sms, cudaStream_t stream);

// Backward, one strip of rows [row_begin, row_end): writes
//   W[i - row_begin, j] = G_ij / omega   (input dtype, row-major, leading dimension K)
// for every i in the strip and every j < K, and adds sum_ij G_ij * <img_i, txt_j> over
// the strip into *d_scale (float64, device).  Each lse is a float-float pair in log2 units,
// lse = hi + lo (clip_fast.core.numerics.kernel_lse), and P = 2^((S2 - hi) - lo); a pair's
// pointers may be nullptr when the matching coefficient is zero.  g_diag (min(M, K) floats, or nullptr)
// replaces G's diagonal when given; otherwise G_ii gets - coef_diag.
cudaError_t launch_grad_strip(InputKind kind, const void* img, const void* txt, int64_t M,
                              int64_t K, int64_t D, int64_t row_begin, int64_t row_end,
                              const float* scale, const float* bias, const float* lse_row,
                              const float* lse_row_lo, const float* lse_col,
                              const float* lse_col_lo, const float* g_diag, float coef_row,
                              float coef_col, float coef_diag, float inv_omega, void* W,
                              double* d_scale, cudaStream_t stream);

}  // namespace clip_fast
