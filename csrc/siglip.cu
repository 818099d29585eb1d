// SigLIP: the elementwise sweep of one block of S, giving the loss terms, G and the
// d_scale / d_bias row sums (clip_fast/siglip/backends/__init__.py holds the contract and the
// numbered numerics this file follows; kernels/siglip.py is the Triton twin).
//
// One CTA per row of the block: its threads stride over the columns, each keeping
// float64 partial sums, reduced in shared memory at the end and added to the row's
// cells.  One CTA owns a row within a launch and launches are ordered on the stream, so
// the sums need no atomics and are deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "siglip.h"

namespace clip_fast {
namespace {

constexpr int kThreads = 256;
// log2(e) as a float32 pair (hi + lo), and ln 2.
constexpr float kLog2eHi = 1.4426950216293335f;
constexpr float kLog2eLo = 1.925963001510248e-08f;
constexpr float kLn2 = 0.6931471805599453f;
// 2^-TINY_SHIFT with TINY_SHIFT = 96 (clip_fast.core.numerics.TINY_SHIFT).
constexpr float kTinyShift = 96.0f;
constexpr float kTinyUnshift = 1.262177448353619e-29f;
constexpr float kTinyInverse = 7.922816251426434e+28f;  // 2^96

template <typename T> __device__ __forceinline__ T to_out(float v);
template <> __device__ __forceinline__ float to_out<float>(float v) { return v; }
template <> __device__ __forceinline__ __half to_out<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int LABELS, bool NEED_GRAD>
__global__ void __launch_bounds__(kThreads) siglip_rows_kernel(
    const float* __restrict__ raw, int64_t ldr, int64_t C, int64_t row0, int64_t col0,
    const float* __restrict__ scale, const float* __restrict__ bias,
    const int64_t* __restrict__ ids_row, const int64_t* __restrict__ ids_col,
    T* __restrict__ W, int64_t ldw, double* __restrict__ row_sums, int64_t M) {
  const int64_t i = blockIdx.x;  // row inside the block
  const int64_t gi = row0 + i;   // global row
  const float sc = *scale;
  const float bi = bias != nullptr ? *bias : 0.0f;
  const int64_t id_i = LABELS == 2 ? ids_row[gi] : 0;
  double loss = 0.0, tiny = 0.0, dscale = 0.0, dbias = 0.0;
  const float* raw_row = raw + i * ldr;
  for (int64_t j = threadIdx.x; j < C; j += kThreads) {
    const int64_t gj = col0 + j;
    const float acc = raw_row[j];
    // 2. S = fma(acc, s, b) and the labels: x = -z S.
    const float s_ij = fmaf(acc, sc, bi);
    bool pos = false;
    if (LABELS == 1) pos = gi == gj;
    if (LABELS == 2) pos = id_i == ids_col[gj];
    const float x = pos ? -s_ij : s_ij;
    // 3. e = exp(-|x|) = 2^-y (1 - y_lo ln 2), y + y_lo = |x| log2 e to ~2^-48 relative;
    //    one exp2: of 96 - y where y >= 48 (exact, Sterbenz), else of -y; eb = e 2^96 and
    //    e by exact power-of-two scalings.  softplus(x) = max(x, 0) + log1p(e), log1p(e) =
    //    ln 2 log2(u) e / (u - 1), u = 1 + e; where u rounds to 1, log1p(e) = e, summed
    //    as eb in the tiny sum.
    const float ax = fabsf(x);
    const float y = ax * kLog2eHi;
    const float y_lo = fmaf(ax, kLog2eHi, -y) + ax * kLog2eLo;
    const bool far = y >= 48.0f;
    const float t = exp2f(far ? kTinyShift - y : -y) * (1.0f - y_lo * kLn2);
    const float e = far ? t * kTinyUnshift : t;
    const float u = 1.0f + e;
    if (u == 1.0f) {
      loss += fmaxf(x, 0.0f);
      tiny += far ? t : t * kTinyInverse;
    } else {
      loss += fmaxf(x, 0.0f) + (log2f(u) * kLn2) * (e / (u - 1.0f));
    }
    if (NEED_GRAD) {
      // 4. G = -z sigmoid(x): 1 / u for x >= 0, e / u for x < 0.
      const float sig = x >= 0.0f ? 1.0f / u : e / u;
      const float g = pos ? -sig : sig;
      dscale += static_cast<double>(g) * acc;
      dbias += g;
      W[i * ldw + j] = to_out<T>(g);
    }
  }
  // 5. Block reduction of the four float64 partials.
  __shared__ double red[4][kThreads];
  red[0][threadIdx.x] = loss;
  red[1][threadIdx.x] = tiny;
  red[2][threadIdx.x] = dscale;
  red[3][threadIdx.x] = dbias;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      for (int k = 0; k < 4; ++k) red[k][threadIdx.x] += red[k][threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    for (int k = 0; k < (NEED_GRAD ? 4 : 2); ++k) row_sums[k * M + gi] += red[k][0];
  }
}

template <typename T, int LABELS>
cudaError_t launch_typed(const float* raw, int64_t ldr, int64_t R, int64_t C, int64_t row0,
                         int64_t col0, int64_t M, const float* scale, const float* bias,
                         const int64_t* ids_row, const int64_t* ids_col, void* W, int64_t ldw,
                         double* row_sums, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(R));
  if (W != nullptr) {
    siglip_rows_kernel<T, LABELS, true><<<grid, kThreads, 0, stream>>>(
        raw, ldr, C, row0, col0, scale, bias, ids_row, ids_col, static_cast<T*>(W), ldw,
        row_sums, M);
  } else {
    siglip_rows_kernel<T, LABELS, false><<<grid, kThreads, 0, stream>>>(
        raw, ldr, C, row0, col0, scale, bias, ids_row, ids_col, nullptr, ldw, row_sums, M);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_labels(int labels, const float* raw, int64_t ldr, int64_t R, int64_t C,
                          int64_t row0, int64_t col0, int64_t M, const float* scale,
                          const float* bias, const int64_t* ids_row, const int64_t* ids_col,
                          void* W, int64_t ldw, double* row_sums, cudaStream_t stream) {
  switch (labels) {
    case 0:
      return launch_typed<T, 0>(raw, ldr, R, C, row0, col0, M, scale, bias, ids_row, ids_col,
                                W, ldw, row_sums, stream);
    case 1:
      return launch_typed<T, 1>(raw, ldr, R, C, row0, col0, M, scale, bias, ids_row, ids_col,
                                W, ldw, row_sums, stream);
    default:
      return launch_typed<T, 2>(raw, ldr, R, C, row0, col0, M, scale, bias, ids_row, ids_col,
                                W, ldw, row_sums, stream);
  }
}

}  // namespace

cudaError_t launch_siglip_rows(int dtype_code, const float* raw, int64_t ldr, int64_t R,
                               int64_t C, int64_t row0, int64_t col0, int64_t M,
                               const float* scale, const float* bias, int labels,
                               const int64_t* ids_row, const int64_t* ids_col, void* W,
                               int64_t ldw, double* row_sums, cudaStream_t stream) {
  if (R <= 0 || C <= 0) return cudaSuccess;
  switch (dtype_code) {
    case 0:
      return launch_labels<__half>(labels, raw, ldr, R, C, row0, col0, M, scale, bias, ids_row,
                                   ids_col, W, ldw, row_sums, stream);
    case 1:
      return launch_labels<__nv_bfloat16>(labels, raw, ldr, R, C, row0, col0, M, scale, bias,
                                          ids_row, ids_col, W, ldw, row_sums, stream);
    default:
      return launch_labels<float>(labels, raw, ldr, R, C, row0, col0, M, scale, bias, ids_row,
                                  ids_col, W, ldw, row_sums, stream);
  }
}

}  // namespace clip_fast
