"""SigLIP backends: one tiled sweep gives the sigmoid loss and every gradient.

Every SigLIP backend module (``torch_backend``, ``triton_backend``, ``cuda_backend`` beside this file)
implements one function on one *block* ``S = scale * img @ txt.T + bias`` of shape
(M, K).  Nothing of size M x K is returned or kept (a bounded workspace at most).

``siglip_block(img, txt, scale, bias, ids_row, ids_col, diag_positive, need_grad)
        -> (loss_sum, d_img, d_txt, d_scale, d_bias)``
    img: (M, D), txt: (K, D), same floating dtype and device, any strides.
    scale: 0-d float32 tensor (float64 for float64 inputs), already exponentiated.
    bias: 0-d tensor like scale, or None (no bias).
    The labels z_ij (+1 a positive pair, -1 a negative one):
        ids_row (M,) and ids_col (K,) int64 given: z_ij = +1 where ids_row[i] == ids_col[j];
        else diag_positive True: z_ij = +1 where i == j (the local square block);
        else: z_ij = -1 everywhere (a block of another rank's texts: negatives only).
    With x_ij = -z_ij * S_ij:
        loss_sum = sum_ij softplus(x_ij) = -sum_ij log sigmoid(z_ij S_ij)   float64, 0-d
        G_ij     = d loss_sum / d S_ij = -z_ij * sigmoid(x_ij)
        d_img    = scale * G @ txt          (M, D)
        d_txt    = scale * G.T @ img        (K, D)
        d_scale  = sum_ij G_ij * <img_i, txt_j>   float64, 0-d
        d_bias   = sum_ij G_ij                    float64, 0-d
    d_img and d_txt are float32 (float64 for float64 inputs); with ``need_grad`` False
    they are empty (0, D) tensors and d_scale = d_bias = 0 (the forward of a loss nobody
    differentiates skips the two gradient GEMMs).  The caller divides by N, multiplies by
    the upstream gradient and casts.

Numerics, shared by every backend (the kernels cite this page):
1. S is accumulated in float32 (float64 for float64 inputs) whatever the input dtype,
   as a materialised fp32 loss would.
2. S = fma(acc, scale, bias), x = -z S, and softplus in exp2/log2 units: with
   e = exp(-|x|) = 2^-(|x| log2 e),
       softplus(x) = max(x, 0) + log1p(e)
   never overflows (no exp of a positive number).  |x| log2 e is carried as a float32
   pair (log2 e split in hi + lo; the product's rounding error recovered exactly, by
   Dekker's product in Triton and an fma in CUDA) and
   e = 2^-y (1 - y_lo ln 2): one float32 product would put |S| 2^-24 into e's exponent
   (a relative error of 5e-6 at |S| = 90, above the rounding of S itself).
   log1p(e) = ln 2 * log2(u) * e / (u - 1) with u = 1 + e (log1p-accurate), or e once
   u rounds to 1.
3. Tiny terms: at |S| = 100, softplus(-100) = e^-100 = 2^-144 is below float32's normal
   range.  The kernels take ``eb = e * 2^96`` (normal for |S| < 154; formed by one exp2
   of 96 - y where y >= 48, an exact subtraction) and, where u rounds to 1, add eb to
   a second per-row sum that is scaled by 2^-96 in float64: a batch of confident pairs
   at |S| = 90 to 100 gets a loss accurate to the rounding of S instead of a flushed or
   denormal one.
4. sigmoid(x) = 1 / u for x >= 0 and e / u for x < 0 (no cancellation either way).
5. Reductions: each tile's row sums in float32, then across tiles in float64 (loss,
   d_scale, d_bias); never one float32 accumulator over N^2 terms.

Each SigLIP backend module also defines ``unavailable_reason(device, dtype)`` and ``NAME``.
"""
from __future__ import annotations

from ...core.numerics import TINY_SHIFT, siglip_block_meta  # noqa: F401  (numerics step 3; the ops' fakes)
from ...core.registry import BackendFamily

# The SigLIP backends, loaded and chosen by the same rule as the CLIP loss's
# (``clip_fast.core.registry.BackendFamily``: the CUDA extension is not auto-picked before a
# committed GPU measurement shows it faster).
_SIGLIP = BackendFamily("SigLIP ", {
    "torch": "clip_fast.siglip.backends.torch_backend",
    "triton": "clip_fast.siglip.backends.triton_backend",
    "cuda": "clip_fast.siglip.backends.cuda_backend",
})
preload = _SIGLIP.preload
unavailable_reason = _SIGLIP.unavailable_reason
resolve_backend = _SIGLIP.resolve
get_loaded = _SIGLIP.get_loaded
