// The constants of the column shift and its underflow check, shared by every CUDA kernel.
// Derived once in docs/numerics.md; kernels/lse_forward.py defines the same values for Triton.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace clip_fast {

// c_j = |s| * |txt_j| * max_i |img_i| * kColSlack + b >= S_ij (Cauchy-Schwarz plus rounding).
constexpr float kColSlack = 1.0078125f;  // 1 + 2^-7
// A column whose whole shifted sum is below this is recomputed exactly.
constexpr float kColUnderflow = 2.11758236813575084e-22f;  // 2^-72

// Headroom H2 (log2 units) for column sums over M rows: M terms of at most 2^H2 stay below
// 2^122.  An integer, so H2 - c2_j rounds the same on the host and in a kernel.
inline float headroom_log2(int64_t M) {
  const double bits = std::ceil(std::log2(static_cast<double>(M) + 1.0));
  return static_cast<float>(std::min(100.0, 122.0 - bits));
}

}  // namespace clip_fast
