// The shared tile machinery of both sweeps: load a (64 x 32) slab of img rows and of
// txt rows into shared memory, multiply, and leave the raw dot products
//     acc[r][c] = <rows[row0 + r], cols[col0 + c]>      (fp32)
// of one BM x BN = 64 x 64 tile of img @ txt.T in shared memory for the epilogue.
//
// Design (see also csrc/lse_forward.cu and csrc/grad_backward.cu):
//   * 128 threads (4 warps) per CTA, one 64 x 64 output tile at a time, K-chunks of 32.
//   * Tensor cores through nvcuda::wmma (sm_80+): fp16/bf16 use m16n16k16, float32 with
//     allow_tf32 uses m16n16k8 tf32; each warp owns a 32 x 32 quarter (2 x 2 fragments).
//     Exact float32 uses a register-blocked FMA loop (4 x 8 outputs per thread).
//   * Accumulation is fp32 in every path.
//   * Out-of-range rows, columns and K positions are loaded as zeros, so the masked part
//     of a tile holds exact zeros; the epilogues mask by index, never by value.
//   * The simple synchronous global->shared copy (no cp.async pipeline) keeps the code
//     reviewable; it is the first thing to improve once a GPU can measure it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <cstddef>

#include "launch.h"

namespace clip_fast {

constexpr int kThreads = 128;      // 4 warps
constexpr int kBM = kBlockM;       // 64 tile rows (img / "rows" side)
constexpr int kBN = kBlockN;       // 64 tile columns (txt / "cols" side)
constexpr int kBK = 32;            // K chunk staged in shared memory
constexpr int kSLd = kBN + 4;      // leading dimension of the fp32 tile (pad: fewer conflicts)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

static_assert(kBM == 64 && kBN == 64 && kThreads == 128,
              "the warp layouts and epilogue thread maps below assume 64 x 64 tiles, 128 threads");

enum class Mma { kWmma16, kWmmaTf32, kSimt };

// ---- per-dtype conversions (explicit: torch builds with __CUDA_NO_HALF_CONVERSIONS__) ----
template <typename T> struct Convert;
template <> struct Convert<float> {
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
};
template <> struct Convert<__half> {
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};
template <> struct Convert<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// Row padding of the staged slabs, in elements.  WMMA needs ldm to be a multiple of 8
// (16-bit) or 4 (32-bit) elements and every fragment pointer 32-byte aligned:
// 40 halves = 80 B and 36 floats = 144 B rows give 16-row offsets of 1280 B / 2304 B
// and K offsets of 32 B, all multiples of 32.
template <typename T> struct SlabPad { static constexpr int value = 8; };
template <> struct SlabPad<float> { static constexpr int value = 4; };

template <typename T>
struct TileSmem {
  static constexpr int kLd = kBK + SlabPad<T>::value;
  alignas(128) T a[kBM][kLd];         // rows[row0 + r][k0 + k]
  alignas(128) T b[kBN][kLd];         // cols[col0 + c][k0 + k]
  alignas(128) float s[kBM][kSLd];    // raw dot products of the current tile
};

// 1. Stage one 64 x 32 slab of rows[row0:row0+64, k0:k0+32] into shared memory.
//    Masked loads: a row >= n_rows or a K position >= D reads nothing and stores 0, so the
//    padding adds exact zeros to every dot product.
//    VEC path (host checked: D a multiple of 16 B worth of elements, both base pointers
//    16-byte aligned): 16-byte loads and stores; since k0 and the vector offset are
//    multiples of the vector width and so is D, a vector is entirely inside or entirely
//    outside [0, D).  Shared rows are 80 B (16-bit) or 144 B (fp32): 16-byte aligned.
//    Scalar path otherwise: a warp covers one row's 32 consecutive K positions.
template <typename T, int ROWS, int LD>
__device__ __forceinline__ void load_slab(T (*dst)[LD], const T* __restrict__ src,
                                          int64_t n_rows, int64_t D, int64_t row0,
                                          int64_t k0, bool vec) {
  if (vec) {
    constexpr int kVec = 16 / sizeof(T);    // elements per 16-byte vector
    constexpr int kVecPerRow = kBK / kVec;  // 4 (16-bit) or 8 (fp32)
#pragma unroll
    for (int e = threadIdx.x; e < ROWS * kVecPerRow; e += kThreads) {
      const int r = e / kVecPerRow, k = (e % kVecPerRow) * kVec;
      const int64_t gr = row0 + r, gk = k0 + k;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits are 0.0 in every dtype
      if (gr < n_rows && gk < D) v = *reinterpret_cast<const uint4*>(src + gr * D + gk);
      *reinterpret_cast<uint4*>(&dst[r][k]) = v;
    }
  } else {
    const T zero = Convert<T>::from_float(0.f);
#pragma unroll 4
    for (int e = threadIdx.x; e < ROWS * kBK; e += kThreads) {
      const int r = e / kBK, k = e % kBK;
      const int64_t gr = row0 + r, gk = k0 + k;
      dst[r][k] = (gr < n_rows && gk < D) ? src[gr * D + gk] : zero;
    }
  }
}

// Whether load_slab may use 16-byte vectors for these operands (host side).
template <typename T>
inline bool can_vectorize(const void* a, const void* b, int64_t D) {
  constexpr int kVec = 16 / sizeof(T);
  return D % kVec == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

// WMMA fragment shapes per path.
template <typename T, Mma MMA> struct WmmaCfg;
template <typename T> struct WmmaCfg<T, Mma::kWmma16> {
  static constexpr int kK = 16;
  using Elem = T;
};
template <> struct WmmaCfg<float, Mma::kWmmaTf32> {
  static constexpr int kK = 8;
  using Elem = nvcuda::wmma::precision::tf32;
};

// 2. acc = rows[row0:row0+64] @ cols[col0:col0+64].T over all of D, into sm.s.
//    Ends with a __syncthreads(): sm.s is complete and visible to every thread.
//    Starts with one too: the previous tile's epilogue may still be reading sm.s.
template <typename T, Mma MMA>
__device__ __forceinline__ void tile_dot(TileSmem<T>& sm, const T* __restrict__ rows,
                                         const T* __restrict__ cols, int64_t n_rows,
                                         int64_t n_cols, int64_t D, int64_t row0,
                                         int64_t col0, bool vec) {
  constexpr int LD = TileSmem<T>::kLd;
  __syncthreads();
  if constexpr (MMA == Mma::kSimt) {
    // Thread (ty, tx) owns rows ty + 16*i and columns tx + 8*j: within a warp the
    // 4 distinct a-rows and 8 distinct b-rows fall in distinct banks (row stride 36).
    const int tx = threadIdx.x & 7, ty = threadIdx.x >> 3;
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    for (int64_t k0 = 0; k0 < D; k0 += kBK) {
      __syncthreads();  // everyone is done reading the previous slab
      load_slab<T, kBM, LD>(sm.a, rows, n_rows, D, row0, k0, vec);
      load_slab<T, kBN, LD>(sm.b, cols, n_cols, D, col0, k0, vec);
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < kBK; ++k) {
        float av[4], bv[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = Convert<T>::to_float(sm.a[ty + 16 * i][k]);
#pragma unroll
        for (int j = 0; j < 8; ++j) bv[j] = Convert<T>::to_float(sm.b[tx + 8 * j][k]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) sm.s[ty + 16 * i][tx + 8 * j] = acc[i][j];
  } else {
    using namespace nvcuda;
    using Cfg = WmmaCfg<T, MMA>;
    constexpr int KS = Cfg::kK;
    using FragA = wmma::fragment<wmma::matrix_a, 16, 16, KS, typename Cfg::Elem, wmma::row_major>;
    // B = cols slab^T: element (k, n) sits at b[n][k], i.e. column-major with ldm = LD.
    using FragB = wmma::fragment<wmma::matrix_b, 16, 16, KS, typename Cfg::Elem, wmma::col_major>;
    using FragC = wmma::fragment<wmma::accumulator, 16, 16, KS, float>;
    const int warp = threadIdx.x >> 5;
    const int wr = (warp >> 1) * 32, wc = (warp & 1) * 32;  // this warp's 32 x 32 quarter
    FragC acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    for (int64_t k0 = 0; k0 < D; k0 += kBK) {
      __syncthreads();
      load_slab<T, kBM, LD>(sm.a, rows, n_rows, D, row0, k0, vec);
      load_slab<T, kBN, LD>(sm.b, cols, n_cols, D, col0, k0, vec);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; kk += KS) {
        FragA fa[2];
        FragB fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(fa[i], &sm.a[wr + 16 * i][kk], LD);
          if constexpr (MMA == Mma::kWmmaTf32) {
#pragma unroll
            for (int t = 0; t < fa[i].num_elements; ++t) fa[i].x[t] = wmma::__float_to_tf32(fa[i].x[t]);
          }
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::load_matrix_sync(fb[j], &sm.b[wc + 16 * j][kk], LD);
          if constexpr (MMA == Mma::kWmmaTf32) {
#pragma unroll
            for (int t = 0; t < fb[j].num_elements; ++t) fb[j].x[t] = wmma::__float_to_tf32(fb[j].x[t]);
          }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&sm.s[wr + 16 * i][wc + 16 * j], acc[i][j], kSLd, wmma::mem_row_major);
  }
  __syncthreads();
}

// 3. One online log-sum-exp step for the 64 rows of the current tile (base 2).
//    Thread t owns row r = t / 2 and half h = t % 2 of the 64 columns; the pair combines
//    through one shuffle, so both threads keep identical (m_run, l_run).
//    v = log2(e) * (scale * acc + bias) = fma(s2, acc, b2).  Only columns < n_cols count,
//    and column skip_col (this row's diagonal, kept out of the sums: docs/numerics.md) is
//    left out.  A row whose entries so far are all left out keeps m_run = -inf; m_ref = 0
//    then keeps every exponent finite (exp2(-inf - -inf) would be NaN).
__device__ __forceinline__ void online_row_step(const float (*s)[kSLd], int64_t col0,
                                                int64_t n_cols, int64_t skip_col, float s2,
                                                float b2, float& m_run, float& l_run) {
  const int r = threadIdx.x >> 1, h = threadIdx.x & 1;
  // Skewed column order (c = h*32 + (it + r) % 32): the 16 rows a warp touches at one
  // step fall in 16 different banks.
  float tmax = -INFINITY;
#pragma unroll 8
  for (int it = 0; it < 32; ++it) {
    const int c = h * 32 + ((it + r) & 31);
    if (col0 + c < n_cols && col0 + c != skip_col) tmax = fmaxf(tmax, fmaf(s2, s[r][c], b2));
  }
  tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
  const float m_new = fmaxf(m_run, tmax);
  const float m_ref = m_new == -INFINITY ? 0.f : m_new;
  float psum = 0.f;
#pragma unroll 8
  for (int it = 0; it < 32; ++it) {
    const int c = h * 32 + ((it + r) & 31);
    if (col0 + c < n_cols && col0 + c != skip_col) psum += exp2f(fmaf(s2, s[r][c], b2) - m_ref);
  }
  psum += __shfl_xor_sync(0xffffffffu, psum, 1);
  l_run = l_run * exp2f(m_run - m_ref) + psum;
  m_run = m_new;
}

}  // namespace clip_fast
