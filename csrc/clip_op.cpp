// clip_fast._C's CLIP ops: input checks and the host side of both sweeps (bound in clip_fast.cpp,
// declared in clip_op.h).
//
// The entry points are torch custom ops in clip_fast_cuda, so that torch.compile sees them
// as single graph nodes; clip_fast/clip/backends/cuda_backend.py registers their fake (meta)
// implementations.
//
//   clip_fast_cuda::lse_forward(img, txt, scale, bias?, allow_tf32?) -> (lse_row, lse_col, diag)
//                                 (float64 vectors, the diagonal added back: see launch.h)
//   clip_fast_cuda::grad_backward(img, txt, scale, bias?, lse_row?, lse_col?,
//                                 coef_row, coef_col, coef_diag, g_diag?, allow_tf32?)
//                                 -> (d_img, d_txt, d_scale)
//                                 (lse in log2 units, float32; d_scale reduced in float64)
//
// allow_tf32 (float32 inputs only): None follows torch's cuBLAS setting
// (at::globalContext().allowTF32CuBLAS(), i.e. torch.backends.cuda.matmul.allow_tf32 /
// torch.set_float32_matmul_precision), read when the op runs; True/False force it for the
// fused tile products (the backward's two cuBLAS GEMMs always follow torch's setting).
//
// Semantics are the backend contract in clip_fast/clip/backends/__init__.py.  Inputs may be
// strided: they are made contiguous here (a copy only when they are not already).
// clip_fast.cpp registers the same functions for the CPU dispatch key too, where they stop
// at the first failed check ("img must be a CUDA tensor ...").
// Only the headers used (not <torch/extension.h>): about 40% less compile time, which CI
// on 2 cores notices.
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "clip_op.h"
#include "launch.h"
#include "workspace.h"

namespace clip_fast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The backward workspace W (R x K, input dtype) holds workspace_bytes() (workspace.h): R is
// as many 64-row blocks as fit (at least one), so each strip's GEMMs stay large for cuBLAS.
constexpr int64_t kMaxStripBlocks = 16384;  // grid.y limit is 65535
constexpr int64_t kIntMax = 2147483647;

// ---- input checks: every message names the tensor and says what it got ----

void check_features(const Tensor& img, const Tensor& txt) {
  TORCH_CHECK(img.dim() == 2, "clip_fast cuda: img must be a 2-D (M, D) tensor, got shape ",
              img.sizes());
  TORCH_CHECK(txt.dim() == 2, "clip_fast cuda: txt must be a 2-D (K, D) tensor, got shape ",
              txt.sizes());
  TORCH_CHECK(img.size(1) == txt.size(1),
              "clip_fast cuda: img and txt must have the same feature size D, got img ",
              img.sizes(), " and txt ", txt.sizes());
  const auto dt = img.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
              "clip_fast cuda: img must be float16, bfloat16 or float32, got ", dt,
              " (use backend='torch' for float64)");
  TORCH_CHECK(txt.scalar_type() == dt, "clip_fast cuda: txt must have img's dtype ", dt,
              ", got ", txt.scalar_type());
  TORCH_CHECK(img.size(0) <= kIntMax && txt.size(0) <= kIntMax && img.size(1) <= kIntMax,
              "clip_fast cuda: sizes must fit in int32 for cuBLAS, got img ", img.sizes(),
              " and txt ", txt.sizes());
}

void check_scalar(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 0, "clip_fast cuda: ", name, " must be a 0-d tensor, got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "clip_fast cuda: ", name,
              " must be float32, got ", t.scalar_type());
}

void check_vector(const Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "clip_fast cuda: ", name,
              " must have shape (", n, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "clip_fast cuda: ", name,
              " must be float32, got ", t.scalar_type());
}

// An lse as the kernels read it: a (2, n) float32 float-float pair (hi, lo) in log2 units.
void check_pair(const Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == 2 && t.size(1) == n, "clip_fast cuda: ", name,
              " must have shape (2, ", n, ") (hi and lo in log2 units), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "clip_fast cuda: ", name,
              " must be float32, got ", t.scalar_type());
}

void check_device(const Tensor& img, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == img.device(), "clip_fast cuda: ", name,
              " must be on img's device ", img.device(), ", got ", t.device());
}

void check_all_devices(const Tensor& img, const Tensor& txt, const Tensor& scale,
                       const OptTensor& bias) {
  TORCH_CHECK(img.is_cuda(), "clip_fast cuda: img must be a CUDA tensor, got device ",
              img.device());
  check_device(img, txt, "txt");
  check_device(img, scale, "scale");
  if (bias.has_value()) check_device(img, *bias, "bias");
}

InputKind input_kind(at::ScalarType dt, std::optional<bool> allow_tf32) {
  switch (dt) {
    case at::kHalf: return InputKind::kHalf;
    case at::kBFloat16: return InputKind::kBFloat16;
    default: {
      const bool tf32 = allow_tf32.has_value() ? *allow_tf32 : at::globalContext().allowTF32CuBLAS();
      return tf32 ? InputKind::kFloat32Tf32 : InputKind::kFloat32Exact;
    }
  }
}

const float* bias_ptr(const OptTensor& bias) {
  return bias.has_value() ? bias->data_ptr<float>() : nullptr;
}

// out (float32) = a @ b for a, b in the input dtype.  float16/bfloat16 go through
// aten::mm.dtype_out (cuBLAS with an fp32 output, no rounding of the result to 16 bits);
// it is looked up at run time so that an older torch without it still works (through an
// fp32 copy of the operands).  float32 is plain at::mm_out (TF32 per torch's setting).
Tensor& mm_float_out(Tensor& out, const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == at::kFloat) return at::mm_out(out, a, b);
  static const std::optional<c10::OperatorHandle> mm_dtype_out =
      c10::Dispatcher::singleton().findOp(c10::OperatorName("aten::mm", "dtype_out"));
  if (mm_dtype_out.has_value()) {
    return mm_dtype_out->typed<Tensor&(const Tensor&, const Tensor&, at::ScalarType, Tensor&)>()
        .call(a, b, at::kFloat, out);
  }
  return at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
}

// ---- the ops ----

// float64 logaddexp(lse_off, diag) over the first diag.size(0) entries (the contract's
// "diagonal added back"), in place on lse_off.
void add_back_diagonal(Tensor& lse_off, const Tensor& diag) {
  Tensor head = lse_off.narrow(0, 0, diag.size(0));
  head.copy_(at::logaddexp(head, diag));
}

// grad_backward's checks: the features and scalars, finite coefficients, each lse present when
// its coefficient is nonzero, and every tensor's shape and device.
void check_backward_inputs(const Tensor& img_in, const Tensor& txt_in, const Tensor& scale,
                           const OptTensor& bias, const OptTensor& lse_row, const OptTensor& lse_col,
                           double coef_row, double coef_col, double coef_diag,
                           const OptTensor& g_diag) {
  check_features(img_in, txt_in);
  check_scalar(scale, "scale");
  if (bias.has_value()) check_scalar(*bias, "bias");
  const int64_t M = img_in.size(0), K = txt_in.size(0);
  TORCH_CHECK(std::isfinite(coef_row) && std::isfinite(coef_col) && std::isfinite(coef_diag),
              "clip_fast cuda: coef_row, coef_col and coef_diag must be finite, got ", coef_row,
              ", ", coef_col, ", ", coef_diag);
  TORCH_CHECK(coef_row == 0.0 || lse_row.has_value(),
              "clip_fast cuda: lse_row is required when coef_row != 0 (got None, coef_row=",
              coef_row, ")");
  TORCH_CHECK(coef_col == 0.0 || lse_col.has_value(),
              "clip_fast cuda: lse_col is required when coef_col != 0 (got None, coef_col=",
              coef_col, ")");
  if (lse_row.has_value()) check_pair(*lse_row, "lse_row", M);
  if (lse_col.has_value()) check_pair(*lse_col, "lse_col", K);
  if (g_diag.has_value()) check_vector(*g_diag, "g_diag", std::min(M, K));
  check_all_devices(img_in, txt_in, scale, bias);
  if (g_diag.has_value()) check_device(img_in, *g_diag, "g_diag");
  if (lse_row.has_value()) check_device(img_in, *lse_row, "lse_row");
  if (lse_col.has_value()) check_device(img_in, *lse_col, "lse_col");
}

// The backward's strip height R: a multiple of 64 rows (at least 64, at most M) with
// R * K * itemsize within the workspace budget (workspace.h).  Clamped while still a double:
// a huge CLIP_FAST_WORKSPACE_MB must not overflow the cast.
int64_t strip_rows(int64_t M, int64_t K, int64_t itemsize) {
  const double budget_elems = workspace_bytes() / static_cast<double>(itemsize);
  const double budget_blocks = std::min(budget_elems / static_cast<double>(K * kBlockM),
                                        static_cast<double>(kMaxStripBlocks));
  const int64_t R = std::max<int64_t>(1, static_cast<int64_t>(budget_blocks)) * kBlockM;
  return std::min(R, M);
}

// Step 2 of the backward on the strip of rows r0..r0+rows: both products from the same W
// (cuBLAS, fp32 accumulation and output).  float16/bfloat16 strips after the first land
// W.T @ img in d_txt_part (allocated once), then add it.
void add_strip_products(const Tensor& W, const Tensor& img, const Tensor& txt, int64_t r0,
                        int64_t rows, Tensor& d_img, Tensor& d_txt, Tensor& d_txt_part) {
  const Tensor Ws = W.narrow(0, 0, rows);
  const Tensor img_s = img.narrow(0, r0, rows);
  Tensor d_img_s = d_img.narrow(0, r0, rows);
  mm_float_out(d_img_s, Ws, txt);
  if (r0 == 0) {
    mm_float_out(d_txt, Ws.t(), img_s);
  } else if (img.scalar_type() == at::kFloat) {
    d_txt.addmm_(Ws.t(), img_s);
  } else {
    if (!d_txt_part.defined()) d_txt_part = at::empty(d_txt.sizes(), d_txt.options());
    mm_float_out(d_txt_part, Ws.t(), img_s);
    d_txt.add_(d_txt_part);
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> lse_forward(const Tensor& img_in, const Tensor& txt_in,
                                               const Tensor& scale, const OptTensor& bias,
                                               std::optional<bool> allow_tf32) {
  check_features(img_in, txt_in);
  check_scalar(scale, "scale");
  if (bias.has_value()) check_scalar(*bias, "bias");
  check_all_devices(img_in, txt_in, scale, bias);

  const c10::cuda::CUDAGuard guard(img_in.device());
  const Tensor img = img_in.contiguous();
  const Tensor txt = txt_in.contiguous();
  const int64_t M = img.size(0), K = txt.size(0), D = img.size(1), n = std::min(M, K);
  const auto f32 = img.options().dtype(at::kFloat);
  const auto f64 = img.options().dtype(at::kDouble);
  if (M == 0 || K == 0) {  // an empty sum: log-sum-exp is -inf
    return {at::full({M}, -INFINITY, f64), at::full({K}, -INFINITY, f64), at::empty({0}, f64)};
  }
  // One workspace: K + 1 norms, K column sums and K column maxima; the row partials of the
  // column splits, filled with (-inf, 0) so splits the grid leaves empty add nothing.
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount,
                                        img.device().index()));
  const int64_t splits = forward_column_splits(M, K, num_sms);
  Tensor ws = at::empty({3 * K + 1}, f32);
  Tensor row_part = at::empty({2, splits, M}, f32);
  row_part[0].fill_(-INFINITY);
  row_part[1].zero_();
  Tensor col_off2 = at::empty({K}, f64);
  Tensor diag2 = at::empty({n}, f32);
  float* norm_ws = ws.data_ptr<float>();
  float* col_sum = norm_ws + (K + 1);
  float* col_max = col_sum + K;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(img.device().index()).stream();
  C10_CUDA_CHECK(launch_lse_forward(input_kind(img.scalar_type(), allow_tf32), img.data_ptr(),
                                    txt.data_ptr(), M, K, D, scale.data_ptr<float>(),
                                    bias_ptr(bias), row_part.data_ptr<float>(),
                                    col_off2.data_ptr<double>(), diag2.data_ptr<float>(), norm_ws,
                                    col_sum, col_max, num_sms, stream));
  // Merge the splits in float64: log2 sum_s l_s 2^m_s (m = -inf rows give -inf).
  const Tensor m_part = row_part[0].to(at::kDouble), l_part = row_part[1].to(at::kDouble);
  const Tensor m_max = m_part.amax(0);
  const Tensor ref = at::where(m_max == -INFINITY, at::zeros_like(m_max), m_max);
  const double ln2 = 0.6931471805599453;
  Tensor lse_row = (ref + at::log2((l_part * at::exp2(m_part - ref)).sum(0))) * ln2;
  Tensor lse_col = col_off2 * ln2;
  const Tensor diag = diag2.to(at::kDouble) * ln2;
  add_back_diagonal(lse_row, diag);
  add_back_diagonal(lse_col, diag);
  return {lse_row, lse_col, diag};
}

std::tuple<Tensor, Tensor, Tensor> grad_backward(const Tensor& img_in, const Tensor& txt_in,
                                                 const Tensor& scale, const OptTensor& bias,
                                                 const OptTensor& lse_row,
                                                 const OptTensor& lse_col, double coef_row,
                                                 double coef_col, double coef_diag,
                                                 const OptTensor& g_diag,
                                                 std::optional<bool> allow_tf32) {
  check_backward_inputs(img_in, txt_in, scale, bias, lse_row, lse_col, coef_row, coef_col, coef_diag,
                        g_diag);
  const int64_t M = img_in.size(0), K = txt_in.size(0), D = img_in.size(1);

  const c10::cuda::CUDAGuard guard(img_in.device());
  const Tensor img = img_in.contiguous();
  const Tensor txt = txt_in.contiguous();
  const auto f32 = img.options().dtype(at::kFloat);
  Tensor d_img = at::empty({M, D}, f32);
  Tensor d_txt = at::empty({K, D}, f32);
  Tensor d_scale = at::zeros({}, img.options().dtype(at::kDouble));
  const double omega = std::max({std::fabs(coef_row), std::fabs(coef_col), std::fabs(coef_diag)});
  if (M == 0 || K == 0 || omega == 0.0) {
    d_img.zero_();
    d_txt.zero_();
    return {d_img, d_txt, d_scale.to(at::kFloat)};
  }
  const Tensor g_d = g_diag.has_value() ? g_diag->contiguous() : Tensor();
  const Tensor lse_r = lse_row.has_value() ? lse_row->contiguous() : Tensor();
  const Tensor lse_c = lse_col.has_value() ? lse_col->contiguous() : Tensor();
  const bool use_row = coef_row != 0.0, use_col = coef_col != 0.0;

  const int64_t R = strip_rows(M, K, img.element_size());
  Tensor W = at::empty({R, K}, img.options());
  Tensor d_txt_part;  // float16/bfloat16 strips after the first (add_strip_products)
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(img.device().index()).stream();
  const InputKind kind = input_kind(img.scalar_type(), allow_tf32);

  for (int64_t r0 = 0; r0 < M; r0 += R) {
    const int64_t r1 = std::min(M, r0 + R);
    // 1. One fused pass over the strip's tiles: W = G / omega, d_scale += <G, img@txt.T>.
    C10_CUDA_CHECK(launch_grad_strip(
        kind, img.data_ptr(), txt.data_ptr(), M, K, D, r0, r1, scale.data_ptr<float>(),
        bias_ptr(bias), use_row ? lse_r.data_ptr<float>() : nullptr,
        use_row ? lse_r.data_ptr<float>() + M : nullptr,
        use_col ? lse_c.data_ptr<float>() : nullptr,
        use_col ? lse_c.data_ptr<float>() + K : nullptr,
        g_d.defined() ? g_d.data_ptr<float>() : nullptr, static_cast<float>(coef_row),
        static_cast<float>(coef_col), static_cast<float>(coef_diag),
        static_cast<float>(1.0 / omega), W.data_ptr(), d_scale.data_ptr<double>(), stream));
    if (D == 0) continue;
    // 2. Both products from the same W (cuBLAS, fp32 accumulation and output).
    add_strip_products(W, img, txt, r0, r1 - r0, d_img, d_txt, d_txt_part);
  }
  // 3. Undo the 1/omega of W and apply the scale: d_img = scale * G @ txt, etc.
  //    (scale stays on the device: no host synchronisation.)
  const Tensor mult = scale * omega;
  d_img.mul_(mult);
  d_txt.mul_(mult);
  return {d_img, d_txt, d_scale.to(at::kFloat)};
}

}  // namespace clip_fast
