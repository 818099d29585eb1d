// clip_fast._C's SigLIP op: input checks and the host side of one block's sweep.
//
//   clip_fast_cuda::siglip_block(img, txt, scale, bias?, ids_row?, ids_col?,
//                                diag_positive, need_grad)
//       -> (loss_sum, d_img, d_txt, d_scale, d_bias)
//
// Bound with the CLIP ops in clip_fast.cpp (siglip_op.h declares it).
// Semantics are the contract in clip_fast/siglip/backends/__init__.py.  Per block of at most
// CLIP_FAST_WORKSPACE_MB (raw float32 + G in the input dtype): cuBLAS gives
// raw = img_blk @ txt_blk.T in float32 (fp16/bf16 with fp32 output; float32 follows
// torch's TF32 setting), csrc/siglip.cu turns it into the loss terms, G and the float64
// row sums, and cuBLAS adds G @ txt_blk to d_img and G.T @ img_blk to d_txt.
// clip_fast/siglip/backends/cuda_backend.py registers the fake (meta) implementation.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "siglip.h"
#include "siglip_op.h"
#include "workspace.h"

namespace clip_fast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr double kTinyUnshift = 1.262177448353619e-29;  // 2^-96 (TINY_SHIFT)

void check_siglip(const Tensor& img, const Tensor& txt, const Tensor& scale,
                  const OptTensor& bias, const OptTensor& ids_row, const OptTensor& ids_col) {
  TORCH_CHECK(img.is_cuda(), "clip_fast cuda siglip: img must be a CUDA tensor, got device ",
              img.device());
  TORCH_CHECK(img.dim() == 2 && txt.dim() == 2,
              "clip_fast cuda siglip: img and txt must be 2-D, got shapes ", img.sizes(), " and ",
              txt.sizes());
  TORCH_CHECK(img.size(1) == txt.size(1),
              "clip_fast cuda siglip: img and txt must have the same D, got ", img.sizes(),
              " and ", txt.sizes());
  TORCH_CHECK(txt.device() == img.device(), "clip_fast cuda siglip: txt is on ", txt.device(),
              " but img is on ", img.device());
  TORCH_CHECK(txt.scalar_type() == img.scalar_type(), "clip_fast cuda siglip: txt has dtype ",
              txt.scalar_type(), " but img has ", img.scalar_type());
  const auto dt = img.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
              "clip_fast cuda siglip: img must be float16, bfloat16 or float32, got ", dt);
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat &&
                  scale.device() == img.device(),
              "clip_fast cuda siglip: scale must be a 1-element float32 tensor on ", img.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == 1 && bias->scalar_type() == at::kFloat &&
                    bias->device() == img.device(),
                "clip_fast cuda siglip: bias must be a 1-element float32 tensor on ", img.device());
  }
  TORCH_CHECK(ids_row.has_value() == ids_col.has_value(),
              "clip_fast cuda siglip: ids_row and ids_col must be given together");
  if (ids_row.has_value()) {
    TORCH_CHECK(ids_row->scalar_type() == at::kLong && ids_row->dim() == 1 &&
                    ids_row->size(0) == img.size(0) && ids_row->device() == img.device(),
                "clip_fast cuda siglip: ids_row must be int64 of shape (", img.size(0), ",) on ",
                img.device(), ", got ", ids_row->scalar_type(), " ", ids_row->sizes());
    TORCH_CHECK(ids_col->scalar_type() == at::kLong && ids_col->dim() == 1 &&
                    ids_col->size(0) == txt.size(0) && ids_col->device() == img.device(),
                "clip_fast cuda siglip: ids_col must be int64 of shape (", txt.size(0), ",) on ",
                img.device(), ", got ", ids_col->scalar_type(), " ", ids_col->sizes());
  }
}

Tensor mm_f32(const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == at::kFloat) return at::mm(a, b);
  return at::mm(a, b, at::kFloat);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> siglip_block(
    const Tensor& img_in, const Tensor& txt_in, const Tensor& scale_in, const OptTensor& bias_in,
    const OptTensor& ids_row_in, const OptTensor& ids_col_in, bool diag_positive,
    bool need_grad) {
  check_siglip(img_in, txt_in, scale_in, bias_in, ids_row_in, ids_col_in);
  const c10::cuda::CUDAGuard guard(img_in.device());
  const Tensor img = img_in.contiguous();
  const Tensor txt = txt_in.contiguous();
  const Tensor scale = scale_in.reshape({}).contiguous();
  const OptTensor bias =
      bias_in.has_value() ? OptTensor(bias_in->reshape({}).contiguous()) : std::nullopt;
  const OptTensor ids_row = ids_row_in.has_value() ? OptTensor(ids_row_in->contiguous()) : std::nullopt;
  const OptTensor ids_col = ids_col_in.has_value() ? OptTensor(ids_col_in->contiguous()) : std::nullopt;
  const int64_t M = img.size(0), K = txt.size(0), D = img.size(1);
  const auto f32 = img.options().dtype(at::kFloat);
  Tensor rows = at::zeros({4, M}, img.options().dtype(at::kDouble));
  Tensor d_img = at::zeros({need_grad ? M : 0, D}, f32);
  Tensor d_txt = at::zeros({need_grad ? K : 0, D}, f32);
  const int labels = ids_row.has_value() ? 2 : (diag_positive ? 1 : 0);
  const auto dt = img.scalar_type();
  const int dtype_code = dt == at::kHalf ? 0 : (dt == at::kBFloat16 ? 1 : 2);
  if (M > 0 && K > 0) {
    // Block shape: raw (float32) and G (input dtype) of R x C within the workspace budget.
    const double per_elem = 4.0 + (need_grad ? static_cast<double>(img.element_size()) : 0.0);
    const int64_t budget = std::max<int64_t>(
        static_cast<int64_t>(workspace_bytes() / per_elem), 256 * 256);
    int64_t C = K, R = M;
    if (M * K > budget) {
      C = std::min<int64_t>(K, std::max<int64_t>(256, static_cast<int64_t>(std::sqrt(double(budget)))));
      R = std::min<int64_t>(M, std::max<int64_t>(1, budget / C));
    }
    Tensor W = need_grad ? at::empty({R, C}, img.options()) : Tensor();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(img.device().index()).stream();
    for (int64_t r0 = 0; r0 < M; r0 += R) {
      const int64_t r = std::min(R, M - r0);
      const Tensor img_blk = img.narrow(0, r0, r);
      for (int64_t c0 = 0; c0 < K; c0 += C) {
        const int64_t c = std::min(C, K - c0);
        const Tensor txt_blk = txt.narrow(0, c0, c);
        const Tensor raw = mm_f32(img_blk, txt_blk.t()).contiguous();
        Tensor g = need_grad ? W.narrow(0, 0, r).narrow(1, 0, c) : Tensor();
        C10_CUDA_CHECK(launch_siglip_rows(
            dtype_code, raw.data_ptr<float>(), raw.stride(0), r, c, r0, c0, M,
            scale.data_ptr<float>(), bias.has_value() ? bias->data_ptr<float>() : nullptr,
            labels, ids_row.has_value() ? ids_row->data_ptr<int64_t>() : nullptr,
            ids_col.has_value() ? ids_col->data_ptr<int64_t>() : nullptr,
            need_grad ? g.data_ptr() : nullptr, need_grad ? g.stride(0) : 0,
            rows.data_ptr<double>(), stream));
        if (need_grad) {
          d_img.narrow(0, r0, r).add_(mm_f32(g, txt_blk));
          d_txt.narrow(0, c0, c).add_(mm_f32(g.t(), img_blk));
        }
      }
    }
  }
  Tensor loss = rows[0].sum() + rows[1].sum() * kTinyUnshift;
  if (need_grad) {
    d_img.mul_(scale);
    d_txt.mul_(scale);
  }
  return {loss, d_img, d_txt, rows[2].sum(), rows[3].sum()};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> siglip_block_cpu(
    const Tensor& img, const Tensor& txt, const Tensor& scale, const OptTensor& bias,
    const OptTensor& ids_row, const OptTensor& ids_col, bool diag_positive, bool need_grad) {
  check_siglip(img, txt, scale, bias, ids_row, ids_col);  // raises: img is not on CUDA
  TORCH_CHECK(false, "clip_fast cuda siglip: unreachable");
}

}  // namespace clip_fast
