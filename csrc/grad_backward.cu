// Backward sweep, one strip of rows at a time.
//
// Design.  The gradients need two products with G (d_img = scale * G @ txt and
// d_txt = scale * G.T @ img).  With D = 512..1024 a CTA cannot hold a 64 x D fp32
// accumulator for both, so the fused part here is the recompute: every tile of S is
// computed exactly ONCE, turned into G and the d_scale partial sum, and G is written to a
// bounded (R x K) workspace W in the input dtype.  The host (csrc/clip_op.cpp) then
// runs two cuBLAS GEMMs per strip (at::mm with a float32 output):
//     d_img[strip] = omega * W @ txt,      d_txt += omega * W.T @ img[strip]
// and multiplies both by scale at the end.  W holds G / omega with omega the largest
// |coefficient| (about 1/N), so its entries are O(1): float16 keeps its precision instead of
// losing G ~ 1/(2N) to the subnormal range.  Memory: R * K elements, never M x K
// (R is chosen on the host from a fixed element budget).
#include "tile.cuh"

namespace clip_fast {
namespace {

template <typename T, Mma MMA>
__global__ void __launch_bounds__(kThreads)
grad_strip_kernel(const T* __restrict__ img, const T* __restrict__ txt, int64_t K, int64_t D,
                  int64_t row_begin, int64_t row_end, const float* __restrict__ scale_ptr,
                  const float* __restrict__ bias_ptr, const float* __restrict__ lse_row,
                  const float* __restrict__ lse_row_lo, const float* __restrict__ lse_col,
                  const float* __restrict__ lse_col_lo, const float* __restrict__ g_diag,
                  float coef_row, float coef_col, float coef_diag, float inv_omega, bool vec,
                  T* __restrict__ W, double* __restrict__ d_scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  __shared__ TileSmem<T> sm;
  // The tile's lse pairs (log2 units, hi + lo): P = 2^((S2 - hi) - lo) keeps a dominant
  // entry's P = 2^-(small lo) exact, as a materialised softmax does (S2 - hi is exact).
  __shared__ float lse_r2[kBM], lse_r2_lo[kBM];
  __shared__ float lse_c2[kBN], lse_c2_lo[kBN];
  __shared__ float warp_sums[kThreads / 32];

  const float s = *scale_ptr;
  const float b = bias_ptr != nullptr ? *bias_ptr : 0.f;
  const float s2 = s * kLog2e, b2 = b * kLog2e;
  const bool has_row = coef_row != 0.f;  // lse_row may be nullptr then (uniform branch)
  const bool has_col = coef_col != 0.f;
  const int tid = threadIdx.x;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t row0 = row_begin + static_cast<int64_t>(blockIdx.y) * kBM;

  // 1. The tile's log-sum-exps (masked: out-of-range entries are never used).
  if (tid < kBM) {
    const int64_t i = row0 + tid;
    lse_r2[tid] = (has_row && i < row_end) ? lse_row[i] : 0.f;
    lse_r2_lo[tid] = (has_row && i < row_end) ? lse_row_lo[i] : 0.f;
  } else {
    const int c = tid - kBM;
    const int64_t j = col0 + c;
    lse_c2[c] = (has_col && j < K) ? lse_col[j] : 0.f;
    lse_c2_lo[c] = (has_col && j < K) ? lse_col_lo[j] : 0.f;
  }
  // (tile_dot starts and ends with __syncthreads(): lse_r2 / lse_c2 are visible after it.)

  // 2. The one recompute of this tile: acc = img[rows] @ txt[cols].T (rows masked at the
  //    strip end, so the strip's last tile reads no row of the next strip).
  tile_dot<T, MMA>(sm, img, txt, row_end, K, D, row0, col0, vec);

  // 3. G_ij = coef_row * P_row + coef_col * P_col - coef_diag * [i == j], written as
  //    G / omega; d_scale partial = sum G_ij * acc_ij.  With g_diag (the host's float64
  //    diagonal from the forward's loss terms), G_ii = g_diag[i]: on a confident row
  //    coef * (P_ii - 1) cancels, and this tile's S_ii need not match the forward's.  Thread t handles elements
  //    t, t + 128, ...: a warp covers 32 consecutive columns of one row, so its W stores
  //    are contiguous and its sm.s reads hit 32 different banks.
  float ds = 0.f;
#pragma unroll 4
  for (int e = tid; e < kBM * kBN; e += kThreads) {
    const int r = e / kBN, c = e % kBN;
    const int64_t gi = row0 + r, gj = col0 + c;
    if (gi < row_end && gj < K) {
      const float acc = sm.s[r][c];
      const float v2 = fmaf(s2, acc, b2);
      float g = 0.f;
      if (has_row) g = coef_row * exp2f((v2 - lse_r2[r]) - lse_r2_lo[r]);
      if (has_col) g = fmaf(coef_col, exp2f((v2 - lse_c2[c]) - lse_c2_lo[c]), g);
      if (gi == gj) g = g_diag != nullptr ? g_diag[gi] : g - coef_diag;
      W[(gi - row_begin) * K + gj] = Convert<T>::from_float(g * inv_omega);
      ds = fmaf(g, acc, ds);
    }
  }

  // 4. One atomicAdd per CTA for d_scale: warp shuffle, then the 4 warp sums, added in
  //    float64 (millions of CTA partials at large N).
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ds += __shfl_xor_sync(0xffffffffu, ds, off);
  if ((tid & 31) == 0) warp_sums[tid >> 5] = ds;
  __syncthreads();
  if (tid == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    atomicAdd(d_scale, static_cast<double>(total));
  }
#endif
}

template <typename T, Mma MMA>
cudaError_t run_grad_strip(const T* img, const T* txt, int64_t K, int64_t D, int64_t row_begin,
                           int64_t row_end, const float* scale, const float* bias,
                           const float* lse_row, const float* lse_row_lo, const float* lse_col,
                           const float* lse_col_lo, const float* g_diag,
                           float coef_row, float coef_col, float coef_diag, float inv_omega,
                           T* W, double* d_scale, cudaStream_t stream) {
  const int64_t rows = row_end - row_begin;
  const dim3 grid(static_cast<unsigned>((K + kBN - 1) / kBN),
                  static_cast<unsigned>((rows + kBM - 1) / kBM));
  grad_strip_kernel<T, MMA><<<grid, kThreads, 0, stream>>>(
      img, txt, K, D, row_begin, row_end, scale, bias, lse_row, lse_row_lo, lse_col, lse_col_lo,
      g_diag, coef_row, coef_col, coef_diag, inv_omega, can_vectorize<T>(img, txt, D), W,
      d_scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_grad_strip(InputKind kind, const void* img, const void* txt, int64_t M,
                              int64_t K, int64_t D, int64_t row_begin, int64_t row_end,
                              const float* scale, const float* bias, const float* lse_row,
                              const float* lse_row_lo, const float* lse_col,
                              const float* lse_col_lo, const float* g_diag, float coef_row,
                              float coef_col, float coef_diag, float inv_omega, void* W,
                              double* d_scale, cudaStream_t stream) {
  if (row_begin < 0 || row_end > M || row_end <= row_begin || K <= 0) return cudaErrorInvalidValue;
  switch (kind) {
    case InputKind::kHalf:
      return run_grad_strip<__half, Mma::kWmma16>(
          static_cast<const __half*>(img), static_cast<const __half*>(txt), K, D, row_begin,
          row_end, scale, bias, lse_row, lse_row_lo, lse_col, lse_col_lo, g_diag, coef_row,
          coef_col, coef_diag, inv_omega, static_cast<__half*>(W), d_scale, stream);
    case InputKind::kBFloat16:
      return run_grad_strip<__nv_bfloat16, Mma::kWmma16>(
          static_cast<const __nv_bfloat16*>(img), static_cast<const __nv_bfloat16*>(txt), K, D,
          row_begin, row_end, scale, bias, lse_row, lse_row_lo, lse_col, lse_col_lo, g_diag,
          coef_row, coef_col, coef_diag, inv_omega, static_cast<__nv_bfloat16*>(W), d_scale,
          stream);
    case InputKind::kFloat32Tf32:
      return run_grad_strip<float, Mma::kWmmaTf32>(
          static_cast<const float*>(img), static_cast<const float*>(txt), K, D, row_begin,
          row_end, scale, bias, lse_row, lse_row_lo, lse_col, lse_col_lo, g_diag, coef_row,
          coef_col, coef_diag, inv_omega, static_cast<float*>(W), d_scale, stream);
    case InputKind::kFloat32Exact:
      return run_grad_strip<float, Mma::kSimt>(
          static_cast<const float*>(img), static_cast<const float*>(txt), K, D, row_begin,
          row_end, scale, bias, lse_row, lse_row_lo, lse_col, lse_col_lo, g_diag, coef_row,
          coef_col, coef_diag, inv_omega, static_cast<float*>(W), d_scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace clip_fast
