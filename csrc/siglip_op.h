// The SigLIP op's host functions (siglip_op.cpp), bound as torch.ops.clip_fast_cuda.siglip_block
// with the CLIP ops in clip_fast.cpp, the one bindings unit.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace clip_fast {

// One block's loss sum and gradients (the contract in clip_fast/siglip/backends/__init__.py).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_block(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& ids_row,
    const std::optional<at::Tensor>& ids_col, bool diag_positive, bool need_grad);

// The CPU registration: stops at the named check (img must be a CUDA tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_block_cpu(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& ids_row,
    const std::optional<at::Tensor>& ids_col, bool diag_positive, bool need_grad);

}  // namespace clip_fast
