"""The exact chunked PyTorch SigLIP backend: any device, any floating dtype, O(N*D) memory.

It sweeps strips of ``C`` rows of ``S = scale * img @ txt.T + bias``: a strip is (C, K)
and is freed before the next, so memory is O(C*K + (M + K)*D), never M x K.  It is the
fallback where Triton and the CUDA extension are missing, and the oracle the fused
kernels are tested against.

Precision (the contract in ``clip_fast.siglip.backends``): the strip GEMM and the
elementwise softplus and sigmoid run in float32 for half, bfloat16 and float32 inputs
(float64 for float64), as the kernels do; torch's float32 exp and log1p are accurate to
an ulp, and the terms below float32's normal range (|x| > 87) are summed shifted by
e^64, so no term is flushed.  The loss, d_scale and d_bias are summed per strip in float64.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ...clip.backends.torch_backend import _strip_diag, strip_rows

NAME = "torch"
# |x| above which exp(-|x|) leaves float32's normal range (2^-126 = e^-87.3), and the
# shift that brings it back: exp(-|x|) = exp(64 - |x|) e^-64.
_FAR = 87.0
_SHIFT = 64.0
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if dtype not in _DTYPES:
        return f"dtype {dtype} is not a floating dtype the torch backend supports ({_DTYPES})"
    return None


def strip_labels(m0: int, m1: int, k: int, ids_row, ids_col, diag_positive: bool,
                 device: torch.device) -> Optional[torch.Tensor]:
    """Boolean (m1 - m0, K) mask of the positive pairs of rows m0..m1, or None if none."""
    if ids_row is not None:
        return ids_row[m0:m1, None] == ids_col[None, :]
    if diag_positive:
        rows = torch.arange(m0, m1, device=device)
        return rows[:, None] == torch.arange(k, device=device)[None, :]
    return None


def siglip_strip_rows(m: int, k: int, chunk_size: Optional[int] = None) -> int:
    """Rows per strip: the user's ``chunk_size``, else strips of 2^20 elements (the float64
    elementwise stage holds a few of them at once)."""
    return strip_rows(m, k, chunk_size) if chunk_size else max(1, min(m, (1 << 20) // max(k, 1)))


def strip_terms(logits: torch.Tensor, r0: int, ids_row, ids_col, diag_positive: bool,
                need_grad: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Steps 2-4 of the contract on one strip of S (rows r0.., overwritten): the strip's
    loss sum (float64, 0-d) and, with ``need_grad``, its G (else None)."""
    cd, f64, dev, k = logits.dtype, torch.float64, logits.device, logits.shape[1]
    # 2. x = -z S: S on the negatives (z = -1), -S on the positives (z = +1); the
    #    diagonal labels negate the strip's diagonal in place.
    pos = None
    arg = logits
    if ids_row is not None:
        pos = strip_labels(r0, r0 + logits.shape[0], k, ids_row, ids_col, diag_positive, dev)
        arg = torch.where(pos, -logits, logits)
    elif diag_positive:
        _strip_diag(arg, r0, k).neg_()
    # 3. Loss terms softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) (no exp of a
    #    positive number).  Below float32's normal range (|x| > 87) e is taken as
    #    exp(64 - |x|), summed and scaled by e^-64 in float64 (there log1p(e) = e), so
    #    a batch of confident pairs at |S| ~ 90 is not flushed (numerics, step 3).
    #    Each row is summed in the compute dtype (torch's pairwise sum), rows in float64.
    a = arg.abs()
    far = a > _FAR if cd != f64 else torch.zeros((), dtype=torch.bool, device=dev)
    t = torch.where(far, _SHIFT - a, -a).exp_()
    loss = (torch.clamp(arg, min=0).sum(dim=1).sum(dtype=f64)
            + torch.log1p(torch.where(far, 0.0, t)).sum(dim=1).sum(dtype=f64)
            + torch.where(far, t, 0.0).sum(dim=1).sum(dtype=f64) * math.exp(-_SHIFT))
    del a, t, far
    if not need_grad:
        return loss, None
    # 4. G = -z sigmoid(x): -sigmoid(x) on positives, +sigmoid(x) on negatives
    #    (torch's sigmoid is accurate for either sign of x).
    grad = torch.sigmoid(arg)
    if pos is not None:
        grad = torch.where(pos, -grad, grad)
    elif diag_positive:
        _strip_diag(grad, r0, k).neg_()
    return loss, grad


@torch.no_grad()
def siglip_block(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                 bias: Optional[torch.Tensor], ids_row: Optional[torch.Tensor],
                 ids_col: Optional[torch.Tensor], diag_positive: bool, need_grad: bool,
                 chunk_size: Optional[int] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # The numbered numerics of the contract, strip by strip, in the order the kernels apply
    # them per tile (steps 2-4 in ``strip_terms``), so the oracle reads beside them.
    cd = torch.float64 if img.dtype == torch.float64 else torch.float32
    f64 = torch.float64
    x, y = img.to(cd), txt.to(cd)  # a copy only for half/bfloat16 inputs: O(N*D)
    s = scale.reshape(()).to(cd)
    b = None if bias is None else bias.reshape(()).to(cd)
    m, k = x.shape[0], y.shape[0]
    c = siglip_strip_rows(m, k, chunk_size)
    dev = x.device
    loss = torch.zeros((), dtype=f64, device=dev)
    d_scale = torch.zeros((), dtype=f64, device=dev)
    d_bias = torch.zeros((), dtype=f64, device=dev)
    d_img = torch.empty_like(x) if need_grad else x.new_empty((0, x.shape[1]))
    d_txt = torch.zeros_like(y) if need_grad else y.new_empty((0, y.shape[1]))
    for r0 in range(0, m, c):
        r1 = min(r0 + c, m)
        # 1. One strip of S in the compute dtype.
        raw = torch.mm(x[r0:r1], y.T)
        logits = raw * s
        if b is not None:
            logits += b
        # 2-4. Its loss terms and G.
        strip_loss, grad = strip_terms(logits, r0, ids_row, ids_col, diag_positive, need_grad)
        loss += strip_loss
        del logits
        if need_grad:
            d_scale += torch.mul(grad, raw).sum(dim=1).sum(dtype=f64)
            d_bias += grad.sum(dim=1).sum(dtype=f64)
            d_img[r0:r1] = torch.mm(grad, y)
            d_txt.addmm_(grad.T, x[r0:r1])
            del grad
        del raw
    if need_grad:
        d_img.mul_(s)
        d_txt.mul_(s)
    return loss, d_img, d_txt, d_scale, d_bias
