// clip_fast._C's bindings, the one unit that registers ops: every loss's CUDA ops in one
// namespace, torch.ops.clip_fast_cuda, so torch.compile sees each as a single graph node
// (their fake implementations are registered in the loss's backends/cuda_backend.py).
//
//   lse_forward, grad_backward  the CLIP sweeps (clip_op.h, clip_op.cpp)
//   siglip_block                SigLIP's one sweep (siglip_op.h, siglip_op.cpp)
//
// The same functions are registered for the CPU dispatch key too, where they stop at the
// first failed check ("img must be a CUDA tensor ..."): a clear error instead of the
// dispatcher's "could not run ... with arguments from the 'CPU' backend".
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "clip_op.h"
#include "siglip_op.h"

#define CLIP_FAST_STR_(x) #x
#define CLIP_FAST_STR(x) CLIP_FAST_STR_(x)
#ifndef CLIP_FAST_ARCH_LIST
#define CLIP_FAST_ARCH_LIST unknown
#endif

namespace clip_fast {
namespace {

std::string compiled_archs() { return CLIP_FAST_STR(CLIP_FAST_ARCH_LIST); }

}  // namespace
}  // namespace clip_fast

TORCH_LIBRARY(clip_fast_cuda, m) {
  m.def("lse_forward(Tensor img, Tensor txt, Tensor scale, Tensor? bias, bool? allow_tf32=None)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("grad_backward(Tensor img, Tensor txt, Tensor scale, Tensor? bias, Tensor? lse_row,"
        " Tensor? lse_col, float coef_row, float coef_col, float coef_diag, Tensor? g_diag=None,"
        " bool? allow_tf32=None)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("siglip_block(Tensor img, Tensor txt, Tensor scale, Tensor? bias, Tensor? ids_row, "
        "Tensor? ids_col, bool diag_positive, bool need_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(clip_fast_cuda, CUDA, m) {
  m.impl("lse_forward", &clip_fast::lse_forward);
  m.impl("grad_backward", &clip_fast::grad_backward);
  m.impl("siglip_block", &clip_fast::siglip_block);
}

// CPU: the same functions, which stop at a named check (see the top of this file).
TORCH_LIBRARY_IMPL(clip_fast_cuda, CPU, m) {
  m.impl("lse_forward", &clip_fast::lse_forward);
  m.impl("grad_backward", &clip_fast::grad_backward);
  m.impl("siglip_block", &clip_fast::siglip_block_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "clip_fast CUDA kernels; the ops live in torch.ops.clip_fast_cuda";
  m.def("compiled_archs", &clip_fast::compiled_archs,
        "The CUDA architectures this build targets, e.g. '80_90' (a trailing 'p': also PTX)");
}
