// Host-side declaration of the SigLIP tile launcher in csrc/siglip.cu.
//
// Like launch.h: the .cu file sees raw pointers, sizes and a stream, no torch headers.
// csrc/siglip_op.cpp does the tensor-level work (checks, the cuBLAS GEMMs via at::mm).
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace clip_fast {

// The SigLIP block's elementwise sweep over one R x C block of raw = img @ txt.T
// (float32, row-major, leading dimension ldr), rows row0.., columns col0.. of the block:
//   x = -z * (scale * raw + bias), z from labels (0: all -1, 1: +1 where row == col
//   globally, 2: +1 where ids_row[row] == ids_col[col]);
//   row_sums[0][row0 + i] += sum_j softplus(x_ij) (all but the tiny log1p terms),
//   row_sums[1][row0 + i] += sum_j exp(-|x_ij|) 2^96 over the tiny terms (host scales 2^-96),
//   and with W != nullptr: W[i, j] = G_ij = -z sigmoid(x) in the input dtype (ld ldw),
//   row_sums[2][row0 + i] += sum_j G_ij raw_ij, row_sums[3][row0 + i] += sum_j G_ij.
// row_sums is 4 x M float64 (device).  dtype_code: 0 float16, 1 bfloat16, 2 float32 (W's type).
cudaError_t launch_siglip_rows(int dtype_code, const float* raw, int64_t ldr, int64_t R,
                               int64_t C, int64_t row0, int64_t col0, int64_t M,
                               const float* scale, const float* bias, int labels,
                               const int64_t* ids_row, const int64_t* ids_col, void* W,
                               int64_t ldw, double* row_sums, cudaStream_t stream);

}  // namespace clip_fast
