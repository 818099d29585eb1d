// Forward sweep: the off-diagonal row and column log-sum-exp and the diagonal of
// S = scale * img @ txt.T + bias in one pass over the tiles of S, nothing M x K stored.
// The diagonal is kept out of every sum and added back by the host in float64
// (lse = logaddexp(lse_offdiag, S_ii)), so lse - S_ii keeps its precision on a confident
// row; the backend contract in clip_fast/clip/backends/__init__.py says why.
//
// Launches (all on the caller's stream):
//   0. row_norms_kernel   : |txt_j| for every j, max_i |img_i| (one warp per row), O((M+K)D).
//   1. lse_forward_kernel : grid (64-row blocks of img) x (column splits); each CTA loops
//                           over the 64-column tiles of its split of txt and
//                             a. keeps an online (max, sum) of its 64 rows' off-diagonal
//                                entries, written per split (the host merges the splits),
//                             b. writes the diagonal S2_ii (log2 units, the very value the
//                                sums would have used) when the tile holds it,
//                             c. adds sum_{i != j} exp2(S2_ij - shift_j) of its rows into
//                                col_sum[j] (one float atomicAdd per column per tile).
//   2. lse_col_finish_kernel: grid over 64-row blocks of txt; turns col_sum into the
//                           off-diagonal column lse (log2 units), and recomputes exactly
//                           (an online row lse of the transposed problem, txt against img)
//                           the columns whose whole sum is unreliable.
//
// The column shift, its headroom and the underflow flag are derived in docs/numerics.md
// (constants in numerics.h, the same as the Triton kernels').  In short: every CTA adds
// 2^(S2_ij - c2_j + H2) with the fixed bound c_j >= S_ij, so the column sums merge by plain
// atomic adds; a column whose whole shifted sum (off-diagonal sum plus the diagonal's own
// term) is below 2^-72 (or not finite) is flagged, and step 2 recomputes it exactly.
// Step 2 costs one extra tiny launch when nothing is flagged: a CTA exits as soon as none
// of its 64 columns is flagged, so there is no host synchronisation and the whole forward
// can be captured in a CUDA graph.
#include <cmath>

#include "numerics.h"
#include "tile.cuh"

namespace clip_fast {
namespace {


// |x_i| for the rows of img (max into *img_norm_max) and txt (into txt_norm), one warp per
// row.  max uses the int ordering of non-negative floats (and NaN's bits, 0x7fc00000, beat
// every finite norm, so a NaN input poisons every shift and flags every column: exact path).
template <typename T>
__global__ void __launch_bounds__(256)
row_norms_kernel(const T* __restrict__ img, const T* __restrict__ txt, int64_t M, int64_t K,
                 int64_t D, float* __restrict__ txt_norm, float* __restrict__ img_norm_max) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= M + K) return;  // whole warps leave together: row is uniform per warp
  const T* src = row < M ? img + row * D : txt + (row - M) * D;
  float ss = 0.f;
  for (int64_t k = lane; k < D; k += 32) {
    const float x = Convert<T>::to_float(src[k]);
    ss = fmaf(x, x, ss);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if (lane == 0) {
    const float norm = sqrtf(ss);
    if (row < M) {
      atomicMax(reinterpret_cast<int*>(img_norm_max), __float_as_int(norm));
    } else {
      txt_norm[row - M] = norm;
    }
  }
}

// atomicMax for floats of either sign (the location starts at -inf): IEEE floats order
// like sign-magnitude integers, so a non-negative value races as a signed int max and a
// negative one as an unsigned min of its bits.
__device__ __forceinline__ void atomic_max_float(float* addr, float v) {
  if (v >= 0.f) {
    atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
  } else {
    atomicMin(reinterpret_cast<unsigned int*>(addr), __float_as_uint(v));
  }
}

// The column shift in base 2: log2(e) * (c_j - H).  One function for both kernels, so
// step 2 undoes exactly the shift step 1 applied.
__device__ __forceinline__ float col_shift2(float bound2, float txt_norm_j, float b2,
                                            float headroom2) {
  return fmaf(bound2, txt_norm_j, b2) - headroom2;
}

template <typename T, Mma MMA>
__global__ void __launch_bounds__(kThreads)
lse_forward_kernel(const T* __restrict__ img, const T* __restrict__ txt, int64_t M, int64_t K,
                   int64_t D, const float* __restrict__ scale_ptr,
                   const float* __restrict__ bias_ptr, const float* __restrict__ txt_norm,
                   const float* __restrict__ img_norm_max, float headroom2, bool vec,
                   int64_t tiles_per_split, float* __restrict__ row_part_m,
                   float* __restrict__ row_part_l, float* __restrict__ diag2,
                   float* __restrict__ col_sum, float* __restrict__ col_max) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // built for an older GPU by request; the host refuses to launch there
#else
  __shared__ TileSmem<T> sm;
  __shared__ float col_part[kBN];
  __shared__ float col_pmax[kBN];

  const float s = *scale_ptr;
  const float b = bias_ptr != nullptr ? *bias_ptr : 0.f;
  const float s2 = s * kLog2e, b2 = b * kLog2e;
  const float bound2 = fabsf(s) * (*img_norm_max) * kColSlack * kLog2e;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int tid = threadIdx.x;
  const int r = tid >> 1, h = tid & 1;            // row map: row r, column half h
  const int cc = tid & (kBN - 1), ch = tid / kBN;  // column map: column cc, row half ch
  const int64_t gi = row0 + r;

  // This CTA's column range: tiles [y * tiles_per_split, (y + 1) * tiles_per_split), never
  // empty (the host sizes the grid so), so m_run below is finite for finite inputs.
  const int64_t col_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split * kBN;
  const int64_t col_end_unclamped = col_begin + tiles_per_split * kBN;
  const int64_t col_end = col_end_unclamped < K ? col_end_unclamped : K;

  float m_run = -INFINITY, l_run = 0.f;
  for (int64_t col0 = col_begin; col0 < col_end; col0 += kBN) {
    tile_dot<T, MMA>(sm, img, txt, M, K, D, row0, col0, vec);

    // a. Online row log-sum-exp of the off-diagonal entries (exact).
    online_row_step(sm.s, col0, K, gi, s2, b2, m_run, l_run);

    // b. Diagonal in log2 units (the fma online_row_step would use), from the thread of
    //    row r that owns the first column half (any thread may read any column of sm.s).
    if (h == 0 && gi < M && gi < K && gi >= col0 && gi < col0 + kBN) {
      diag2[gi] = fmaf(s2, sm.s[r][gi - col0], b2);
    }

    // c. Column partial sums with the shared shift, and column maxima (the host writes a
    //    column's lse relative to its largest S2, so the backward's recomputed S2 gives
    //    exactly P = 1 for a column's dominant entry); thread (cc, ch) covers rows
    //    ch*32 .. ch*32+31 of column cc (consecutive lanes, consecutive banks).
    const int64_t gj = col0 + cc;
    float csum = 0.f, cmax = -INFINITY;
    if (gj < K) {
      const float shift2 = col_shift2(bound2, txt_norm[gj], b2, headroom2);
#pragma unroll 8
      for (int it = 0; it < 32; ++it) {
        const int rr = ch * 32 + it;
        if (row0 + rr < M && row0 + rr != gj) {
          const float v = fmaf(s2, sm.s[rr][cc], b2);
          cmax = fmaxf(cmax, v);
          csum += exp2f(v - shift2);
        }
      }
    }
    if (ch == 1) {
      col_part[cc] = csum;
      col_pmax[cc] = cmax;
    }
    __syncthreads();
    if (ch == 0 && gj < K) {
      csum += col_part[cc];
      cmax = fmaxf(cmax, col_pmax[cc]);
      if (csum != 0.f) atomicAdd(&col_sum[gj], csum);  // NaN != 0: NaN propagates (flagged)
      if (cmax != -INFINITY) atomic_max_float(&col_max[gj], cmax);
    }
    // col_part, col_pmax and sm.s are next written after tile_dot's leading __syncthreads().
  }
  // This split's (max, sum) of the row's off-diagonal entries; the host merges the splits.
  if (h == 0 && gi < M) {
    row_part_m[static_cast<int64_t>(blockIdx.y) * M + gi] = m_run;
    row_part_l[static_cast<int64_t>(blockIdx.y) * M + gi] = l_run;
  }
#endif
}

// Step 2, on the transposed problem: "rows" are txt (K of them), "cols" are img (M).
template <typename T, Mma MMA>
__global__ void __launch_bounds__(kThreads)
lse_col_finish_kernel(const T* __restrict__ txt, const T* __restrict__ img, int64_t K,
                      int64_t M, int64_t D, const float* __restrict__ scale_ptr,
                      const float* __restrict__ bias_ptr, const float* __restrict__ txt_norm,
                      const float* __restrict__ img_norm_max, float headroom2, bool vec,
                      const float* __restrict__ col_sum, const float* __restrict__ col_max,
                      const float* __restrict__ diag2, double* __restrict__ col_off2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  __shared__ TileSmem<T> sm;
  __shared__ int flagged[kBM];

  const float s = *scale_ptr;
  const float b = bias_ptr != nullptr ? *bias_ptr : 0.f;
  const float s2 = s * kLog2e, b2 = b * kLog2e;
  const float bound2 = fabsf(s) * (*img_norm_max) * kColSlack * kLog2e;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int tid = threadIdx.x;

  // a. Finish every reliable column: the off-diagonal lse (log2 units, float64) relative
  //    to the column's largest entry cmax, whose term in col_sum is 2^fl(cmax - shift2):
  //    lse = cmax + log2(sum / 2^fl(cmax - shift2)) (-inf for an empty sum).  Reliable:
  //    the whole shifted sum, the diagonal's own term 2^(S2_jj - shift2_j) included, is a
  //    normal number.
  int my_flag = 0;
  if (tid < kBM) {
    const int64_t j = row0 + tid;
    if (j < K) {
      const float cs = col_sum[j];
      const float shift2 = col_shift2(bound2, txt_norm[j], b2, headroom2);
      const float total = cs + (j < M ? exp2f(diag2[j] - shift2) : 0.f);
      if (total >= kColUnderflow && total <= 3.0e38f) {  // false for NaN and inf
        const float cmax = col_max[j];
        col_off2[j] = cmax == -INFINITY ? -INFINITY
                      : static_cast<double>(cmax) + log2(static_cast<double>(cs)) -
                            static_cast<double>(cmax - shift2);
      } else {
        my_flag = 1;
      }
    }
    flagged[tid] = my_flag;
  }
  // b. Nothing flagged in this block (the usual case): done.  Uniform exit, and the
  //    barrier also publishes flagged[].
  if (!__syncthreads_or(my_flag)) return;

  // c. Exact online log-sum-exp of the off-diagonal S[:, j] = scale * img @ txt_j + bias
  //    for the 64 txt rows of this block, flagged or not (the tile costs the same),
  //    written for flagged ones only.
  const int r = tid >> 1, h = tid & 1;
  const int64_t gj = row0 + r;
  float m_run = -INFINITY, l_run = 0.f;
  for (int64_t col0 = 0; col0 < M; col0 += kBN) {
    tile_dot<T, MMA>(sm, txt, img, K, M, D, row0, col0, vec);
    online_row_step(sm.s, col0, M, gj, s2, b2, m_run, l_run);
  }
  if (h == 0 && gj < K && flagged[r]) {
    col_off2[gj] = static_cast<double>(m_run) + log2(static_cast<double>(l_run));
  }
#endif
}

__global__ void __launch_bounds__(256) fill_kernel(float* __restrict__ out, int64_t n, float v) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = v;
}

template <typename T, Mma MMA>
cudaError_t run_forward(const T* img, const T* txt, int64_t M, int64_t K, int64_t D,
                        const float* scale, const float* bias, float* row_part, double* col_off2,
                        float* diag2, float* norm_ws, float* col_sum, float* col_max, int num_sms,
                        cudaStream_t stream) {
  float* txt_norm = norm_ws;
  float* img_norm_max = norm_ws + K;
  cudaError_t err = cudaMemsetAsync(img_norm_max, 0, sizeof(float), stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(col_sum, 0, sizeof(float) * K, stream);
  if (err != cudaSuccess) return err;
  // col_max starts at -inf, a float pattern cudaMemset (one byte value) cannot write.
  fill_kernel<<<static_cast<unsigned>((K + 255) / 256), 256, 0, stream>>>(col_max, K, -INFINITY);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int64_t norm_blocks = (M + K + 7) / 8;  // 8 warps (rows) per 256-thread block
  row_norms_kernel<T><<<static_cast<unsigned>(norm_blocks), 256, 0, stream>>>(
      img, txt, M, K, D, txt_norm, img_norm_max);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const float headroom2 = headroom_log2(M);
  const bool vec = can_vectorize<T>(img, txt, D);
  const int64_t row_blocks = (M + kBM - 1) / kBM;
  // Column splits: tiles_per_split tiles each.  row_part holds forward_column_splits rows
  // of M partial maxima, then as many of partial sums; splits below that bound leave their
  // rows at (-inf, 0), which the host's merge ignores.
  const int64_t col_tiles = (K + kBN - 1) / kBN;
  const int64_t max_splits = forward_column_splits(M, K, num_sms);
  const int64_t tiles_per_split = (col_tiles + max_splits - 1) / max_splits;
  const int64_t splits = (col_tiles + tiles_per_split - 1) / tiles_per_split;
  float* part_m = row_part;
  float* part_l = row_part + max_splits * M;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits));
  lse_forward_kernel<T, MMA><<<grid, kThreads, 0, stream>>>(
      img, txt, M, K, D, scale, bias, txt_norm, img_norm_max, headroom2, vec, tiles_per_split,
      part_m, part_l, diag2, col_sum, col_max);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int64_t col_blocks = (K + kBM - 1) / kBM;
  lse_col_finish_kernel<T, MMA><<<static_cast<unsigned>(col_blocks), kThreads, 0, stream>>>(
      txt, img, K, M, D, scale, bias, txt_norm, img_norm_max, headroom2, vec, col_sum, col_max,
      diag2, col_off2);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_lse_forward(InputKind kind, const void* img, const void* txt, int64_t M,
                               int64_t K, int64_t D, const float* scale, const float* bias,
                               float* row_part, double* col_off2, float* diag2, float* norm_ws,
                               float* col_sum, float* col_max, int num_sms, cudaStream_t stream) {
  switch (kind) {
    case InputKind::kHalf:
      return run_forward<__half, Mma::kWmma16>(
          static_cast<const __half*>(img), static_cast<const __half*>(txt), M, K, D, scale, bias,
          row_part, col_off2, diag2, norm_ws, col_sum, col_max, num_sms, stream);
    case InputKind::kBFloat16:
      return run_forward<__nv_bfloat16, Mma::kWmma16>(
          static_cast<const __nv_bfloat16*>(img), static_cast<const __nv_bfloat16*>(txt), M, K, D,
          scale, bias, row_part, col_off2, diag2, norm_ws, col_sum, col_max, num_sms, stream);
    case InputKind::kFloat32Tf32:
      return run_forward<float, Mma::kWmmaTf32>(
          static_cast<const float*>(img), static_cast<const float*>(txt), M, K, D, scale, bias,
          row_part, col_off2, diag2, norm_ws, col_sum, col_max, num_sms, stream);
    case InputKind::kFloat32Exact:
      return run_forward<float, Mma::kSimt>(
          static_cast<const float*>(img), static_cast<const float*>(txt), M, K, D, scale, bias,
          row_part, col_off2, diag2, norm_ws, col_sum, col_max, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace clip_fast
