// The CLIP ops' host functions (clip_op.cpp), bound as torch.ops.clip_fast_cuda.lse_forward
// and grad_backward in clip_fast.cpp, the one bindings unit.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace clip_fast {

// (lse_row, lse_col, diag) of one block (the contract in clip_fast/clip/backends/__init__.py).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_forward(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, std::optional<bool> allow_tf32);

// (d_img, d_txt, d_scale) of one block, G from one recompute of each tile.
std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_backward(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lse_row,
    const std::optional<at::Tensor>& lse_col, double coef_row, double coef_col, double coef_diag,
    const std::optional<at::Tensor>& g_diag, std::optional<bool> allow_tf32);

}  // namespace clip_fast
