// Forward sweep: lse_row, lse_col and diag of S = scale * img @ txt.T + bias in one pass
// over the tiles of S, nothing M x K stored.
//
// Launches (all on the caller's stream):
//   0. row_norms_kernel   : |txt_j| for every j, max_i |img_i| (one warp per row), O((M+K)D).
//   1. lse_forward_kernel : grid (64-row blocks of img) x (column splits); each CTA loops
//                           over the 64-column tiles of its split of txt and
//                             a. keeps an exact online log-sum-exp of its 64 rows,
//                             b. writes the diagonal S_ii when the tile holds it,
//                             c. adds sum_i exp(S_ij - shift_j) of its rows into col_sum[j]
//                                (one float atomicAdd per column per tile).
//                           One split (M large) writes lse_row directly; several (M small,
//                           e.g. a distributed block) write partial (max, sum) pairs that
//   1b. merge_row_parts_kernel merges into lse_row.
//   2. lse_col_finish_kernel: grid over 64-row blocks of txt; turns col_sum into lse_col,
//                           and recomputes exactly (an online row lse of the transposed
//                           problem, txt against img) the columns whose sum is unreliable.
//
// Why a fixed shift works for the columns (step 1c).  A column's running maximum cannot
// be merged across CTAs without a second pass, so every CTA uses the same upper bound
//     c_j = |scale| * |txt_j| * max_i |img_i| * (1 + 2^-8) + bias  >=  S_ij   (Cauchy-Schwarz)
// (the 2^-8 slack covers tf32 rounding of the operands and fp32 accumulation error) and
// sums exp(S_ij - c_j + H) with headroom H = 84 - ln(M): every term is <= e^H, so the sum
// of all M terms is <= e^84 < FLT_MAX and cannot overflow.  It can underflow when every
// S_ij of a column lies far below the bound (a column whose best logit is ~125 nats under
// c_j, e.g. all cosines < -0.2 at scale 100): a sum below e^-50 (or not finite) flags the
// column, and step 2 recomputes it exactly.  Above e^-50, terms lost to the fp32 subnormal
// range (< e^-87, at most M of them) change the sum by < M * e^-37: negligible.
// Step 2 costs one extra tiny launch when nothing is flagged: a CTA exits as soon as none
// of its 64 columns is flagged, so there is no host synchronisation and the whole forward
// can be captured in a CUDA graph.
#include <cmath>

#include "tile.cuh"

namespace clip_fast {
namespace {

constexpr float kMinColSum = 1.9287498479639178e-22f;  // e^-50: below this, recompute exactly
constexpr float kBoundSlack = 1.00390625f;              // 1 + 2^-8

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
                   int64_t tiles_per_split, float* __restrict__ lse_row,
                   float* __restrict__ row_part_m, float* __restrict__ row_part_l,
                   float* __restrict__ diag, float* __restrict__ col_sum) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // built for an older GPU by request; the host refuses to launch there
#else
  __shared__ TileSmem<T> sm;
  __shared__ float col_part[kBN];

  const float s = *scale_ptr;
  const float b = bias_ptr != nullptr ? *bias_ptr : 0.f;
  const float s2 = s * kLog2e, b2 = b * kLog2e;
  const float bound2 = fabsf(s) * (*img_norm_max) * kBoundSlack * kLog2e;
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

    // a. Online row log-sum-exp (exact).
    online_row_step(sm.s, col0, K, s2, b2, m_run, l_run);

    // b. Diagonal, from the thread of row r that owns the first column half (any
    //    thread may read any column of sm.s).
    if (h == 0 && gi < M && gi < K && gi >= col0 && gi < col0 + kBN) {
      diag[gi] = fmaf(s, sm.s[r][gi - col0], b);
    }

    // c. Column partial sums with the shared shift; thread (cc, ch) sums rows
    //    ch*32 .. ch*32+31 of column cc (consecutive lanes, consecutive banks).
    const int64_t gj = col0 + cc;
    float csum = 0.f;
    if (gj < K) {
      const float shift2 = col_shift2(bound2, txt_norm[gj], b2, headroom2);
#pragma unroll 8
      for (int it = 0; it < 32; ++it) {
        const int rr = ch * 32 + it;
        if (row0 + rr < M) csum += exp2f(fmaf(s2, sm.s[rr][cc], b2) - shift2);
      }
    }
    if (ch == 1) col_part[cc] = csum;
    __syncthreads();
    if (ch == 0 && gj < K) {
      csum += col_part[cc];
      if (csum != 0.f) atomicAdd(&col_sum[gj], csum);  // NaN != 0: NaN propagates (flagged)
    }
    // col_part and sm.s are next written after tile_dot's leading __syncthreads().
  }
  if (h == 0 && gi < M) {
    if (row_part_m == nullptr) {  // one split: the row is complete
      lse_row[gi] = (m_run + log2f(l_run)) * kLn2;
    } else {                      // partial (max, sum) of this column range, merged later
      row_part_m[static_cast<int64_t>(blockIdx.y) * M + gi] = m_run;
      row_part_l[static_cast<int64_t>(blockIdx.y) * M + gi] = l_run;
    }
  }
#endif
}

// 1b. Merge the per-split partial row log-sum-exps (base 2): m = max_s m_s,
//     l = sum_s l_s * 2^(m_s - m), lse = ln2 * (m + log2 l).
__global__ void __launch_bounds__(256)
merge_row_parts_kernel(const float* __restrict__ part_m, const float* __restrict__ part_l,
                       int64_t M, int64_t splits, float* __restrict__ lse_row) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M) return;
  float m = -INFINITY;
  for (int64_t sp = 0; sp < splits; ++sp) m = fmaxf(m, part_m[sp * M + i]);
  float l = 0.f;
  for (int64_t sp = 0; sp < splits; ++sp) l += part_l[sp * M + i] * exp2f(part_m[sp * M + i] - m);
  lse_row[i] = (m + log2f(l)) * kLn2;
}

// Step 2, on the transposed problem: "rows" are txt (K of them), "cols" are img (M).
template <typename T, Mma MMA>
__global__ void __launch_bounds__(kThreads)
lse_col_finish_kernel(const T* __restrict__ txt, const T* __restrict__ img, int64_t K,
                      int64_t M, int64_t D, const float* __restrict__ scale_ptr,
                      const float* __restrict__ bias_ptr, const float* __restrict__ txt_norm,
                      const float* __restrict__ img_norm_max, float headroom2, bool vec,
                      const float* __restrict__ col_sum, float* __restrict__ lse_col) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  __shared__ TileSmem<T> sm;
  __shared__ int flagged[kBM];

  const float s = *scale_ptr;
  const float b = bias_ptr != nullptr ? *bias_ptr : 0.f;
  const float s2 = s * kLog2e, b2 = b * kLog2e;
  const float bound2 = fabsf(s) * (*img_norm_max) * kBoundSlack * kLog2e;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int tid = threadIdx.x;

  // a. Finish every reliable column: lse = ln(sum) + c_j - H.
  int my_flag = 0;
  if (tid < kBM) {
    const int64_t j = row0 + tid;
    if (j < K) {
      const float cs = col_sum[j];
      if (cs >= kMinColSum && cs <= 3.0e38f) {  // false for NaN and inf
        lse_col[j] = (log2f(cs) + col_shift2(bound2, txt_norm[j], b2, headroom2)) * kLn2;
      } else {
        my_flag = 1;
      }
    }
    flagged[tid] = my_flag;
  }
  // b. Nothing flagged in this block (the usual case): done.  Uniform exit, and the
  //    barrier also publishes flagged[].
  if (!__syncthreads_or(my_flag)) return;

  // c. Exact online log-sum-exp of S[:, j] = scale * img @ txt_j + bias for the 64 txt
  //    rows of this block, flagged or not (the tile costs the same), written for flagged
  //    ones only.
  const int r = tid >> 1, h = tid & 1;
  const int64_t gj = row0 + r;
  float m_run = -INFINITY, l_run = 0.f;
  for (int64_t col0 = 0; col0 < M; col0 += kBN) {
    tile_dot<T, MMA>(sm, txt, img, K, M, D, row0, col0, vec);
    online_row_step(sm.s, col0, M, s2, b2, m_run, l_run);
  }
  if (h == 0 && gj < K && flagged[r]) lse_col[gj] = (m_run + log2f(l_run)) * kLn2;
#endif
}

template <typename T, Mma MMA>
cudaError_t run_forward(const T* img, const T* txt, int64_t M, int64_t K, int64_t D,
                        const float* scale, const float* bias, float* lse_row, float* lse_col,
                        float* diag, float* norm_ws, float* col_sum, float* row_part,
                        int num_sms, cudaStream_t stream) {
  float* txt_norm = norm_ws;
  float* img_norm_max = norm_ws + K;
  cudaError_t err = cudaMemsetAsync(img_norm_max, 0, sizeof(float), stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(col_sum, 0, sizeof(float) * K, stream);
  if (err != cudaSuccess) return err;

  const int64_t norm_blocks = (M + K + 7) / 8;  // 8 warps (rows) per 256-thread block
  row_norms_kernel<T><<<static_cast<unsigned>(norm_blocks), 256, 0, stream>>>(
      img, txt, M, K, D, txt_norm, img_norm_max);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  // Headroom H = 84 - ln(M) nats, in base 2.
  const float headroom2 = static_cast<float>((84.0 - std::log(static_cast<double>(M))) * 1.4426950408889634);
  const bool vec = can_vectorize<T>(img, txt, D);
  const int64_t row_blocks = (M + kBM - 1) / kBM;
  // Column splits: tiles_per_split tiles each, and exactly as many splits as are non-empty
  // (<= forward_column_splits, which sized row_part).
  const int64_t col_tiles = (K + kBN - 1) / kBN;
  const int64_t max_splits = forward_column_splits(M, K, num_sms);
  const int64_t tiles_per_split = (col_tiles + max_splits - 1) / max_splits;
  const int64_t splits = (col_tiles + tiles_per_split - 1) / tiles_per_split;
  float* part_m = splits > 1 ? row_part : nullptr;
  float* part_l = splits > 1 ? row_part + splits * M : nullptr;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits));
  lse_forward_kernel<T, MMA><<<grid, kThreads, 0, stream>>>(
      img, txt, M, K, D, scale, bias, txt_norm, img_norm_max, headroom2, vec, tiles_per_split,
      lse_row, part_m, part_l, diag, col_sum);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (splits > 1) {
    merge_row_parts_kernel<<<static_cast<unsigned>((M + 255) / 256), 256, 0, stream>>>(
        part_m, part_l, M, splits, lse_row);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }

  const int64_t col_blocks = (K + kBM - 1) / kBM;
  lse_col_finish_kernel<T, MMA><<<static_cast<unsigned>(col_blocks), kThreads, 0, stream>>>(
      txt, img, K, M, D, scale, bias, txt_norm, img_norm_max, headroom2, vec, col_sum, lse_col);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_lse_forward(InputKind kind, const void* img, const void* txt, int64_t M,
                               int64_t K, int64_t D, const float* scale, const float* bias,
                               float* lse_row, float* lse_col, float* diag, float* norm_ws,
                               float* col_sum, float* row_part, int num_sms,
                               cudaStream_t stream) {
  switch (kind) {
    case InputKind::kHalf:
      return run_forward<__half, Mma::kWmma16>(
          static_cast<const __half*>(img), static_cast<const __half*>(txt), M, K, D, scale, bias,
          lse_row, lse_col, diag, norm_ws, col_sum, row_part, num_sms, stream);
    case InputKind::kBFloat16:
      return run_forward<__nv_bfloat16, Mma::kWmma16>(
          static_cast<const __nv_bfloat16*>(img), static_cast<const __nv_bfloat16*>(txt), M, K, D,
          scale, bias, lse_row, lse_col, diag, norm_ws, col_sum, row_part, num_sms, stream);
    case InputKind::kFloat32Tf32:
      return run_forward<float, Mma::kWmmaTf32>(
          static_cast<const float*>(img), static_cast<const float*>(txt), M, K, D, scale, bias,
          lse_row, lse_col, diag, norm_ws, col_sum, row_part, num_sms, stream);
    case InputKind::kFloat32Exact:
      return run_forward<float, Mma::kSimt>(
          static_cast<const float*>(img), static_cast<const float*>(txt), M, K, D, scale, bias,
          lse_row, lse_col, diag, norm_ws, col_sum, row_part, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace clip_fast
