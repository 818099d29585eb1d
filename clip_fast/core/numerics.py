"""The numerics helpers shared by the backends and the kernels (``docs/numerics.md``).

The compute dtype (``clip_fast.core.checks.as_scalar_tensor`` converts ``logit_scale`` and
``logit_bias`` to it once, for every backend and kernel), the float-float lse a kernel backward reads, G's diagonal from the
forward's float64 loss terms, d_scale from the gradient's rows, and the SigLIP kernels'
tiny-term shift.  The contract they serve is in ``clip_fast.clip.backends`` (CLIP) and
``clip_fast.siglip.backends`` (SigLIP).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype S is accumulated in: float64 for float64 features, float32 for every other."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_scalar(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A detached 0-d tensor of ``dtype`` (None stays None): the torch backend's reading of
    ``scale``/``bias`` for its own compute dtype, which a direct caller may choose."""
    if t is None:
        return None
    return t.detach().reshape(()).to(dtype)


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_dtype_reason(dtype: torch.dtype, label: str) -> Optional[str]:
    """Why the fused-kernel backend ``label`` cannot take ``dtype``, or None if it can."""
    if dtype in KERNEL_DTYPES:
        return None
    extra = " (use backend='torch' for float64)" if dtype == torch.float64 else ""
    return f"dtype {dtype} is not supported by the {label} backend, which takes {KERNEL_DTYPES}{extra}"


LOG2E = 1.4426950408889634


def kernel_lse(lse: Optional[torch.Tensor], coef: float) -> Optional[torch.Tensor]:
    """The lse a kernel backward reads: a (2, n) float32 float-float pair in log2 units.

    Row 0 is ``hi``, the float32 rounding of lse * log2(e) (taken in float64), row 1 is
    ``lo``, the float32 rounding of the rest.  A kernel forms P = 2^((S2 - hi) - lo): on a
    row whose largest entry carries almost all the mass, S2 - hi is exactly 0 and P
    keeps the tiny 2^-lo a materialised softmax gives, which one float32 lse would round
    away.  None when the coefficient switches the term off.
    """
    if lse is None or not coef:
        return None
    return torch.stack(split_float(lse.to(torch.float64) * LOG2E))


def split_float(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 ``x`` as float32 ``(hi, lo)`` with hi + lo = x to ~2^-48 (lo = 0 where x is not finite)."""
    hi = x.float()
    lo = torch.where(torch.isfinite(hi), x - hi.to(torch.float64), 0.0).float()
    return hi, lo


def diag_grad(lse_row: Optional[torch.Tensor], lse_col: Optional[torch.Tensor],
              diag: torch.Tensor, coef_row: float, coef_col: float,
              coef_diag: Union[float, torch.Tensor]) -> torch.Tensor:
    """G's diagonal, ``coef_row * P_row_ii + coef_col * P_col_ii - coef_diag``, in float64.

    Formed from the forward's float64 loss terms ``lse - diag`` as
    ``coef_row * expm1(diag - lse_row) + coef_col * expm1(diag - lse_col)
    + (coef_row + coef_col - coef_diag)``: for the CLIP loss the constant is 0 and the
    two expm1 terms are small and accurate on a confident row, where ``P_ii - 1`` in
    float32 would be pure rounding.  ``coef_diag`` may be a float64 vector (one target
    weight per row: positive groups and label smoothing, see ``clip_fast.clip.targets``).
    """
    n = diag.shape[0]
    out = torch.full((n,), float(coef_row) + float(coef_col), dtype=torch.float64, device=diag.device)
    out -= coef_diag if isinstance(coef_diag, torch.Tensor) else float(coef_diag)
    d = diag.to(torch.float64)
    if coef_row:
        out += float(coef_row) * torch.expm1(d - lse_row[:n].to(torch.float64))
    if coef_col:
        out += float(coef_col) * torch.expm1(d - lse_col[:n].to(torch.float64))
    return out


def diag_coef_scalar(coef_diag: Union[float, torch.Tensor]) -> float:
    """``coef_diag`` as the float a kernel reads for its scaling: a per-row vector (which
    only ever comes with ``diag``, so G's diagonal is ``g_diag``) gives its largest |entry|."""
    if isinstance(coef_diag, torch.Tensor):
        return float(coef_diag.abs().max()) if coef_diag.numel() else 0.0
    return float(coef_diag)


def scale_grad_from_rows(d_img: torch.Tensor, img: torch.Tensor, d_txt: torch.Tensor, txt: torch.Tensor,
                         coef_row: float, scale: torch.Tensor, d_scale: torch.Tensor) -> torch.Tensor:
    """d_scale = sum_ij G_ij <img_i, txt_j> re-formed as sum_i <(G @ txt)_i, img_i> / scale
    from a kernel's ``d_img = scale * G @ txt`` (``d_scale``, the kernel's own sum, where
    scale is 0), or, for a column-only G (``coef_row`` 0), as sum_j <(G.T @ img)_j, txt_j>.

    Each row of a row-softmax G (each column of a column-softmax G) sums to about 0, so
    the per-entry sum cancels terms of size |raw|; contracting along that direction first
    keeps the cancellation inside the GEMM, as the materialised loss's autograd forms it,
    and is the more accurate in fp32 at large |S|.  Row dots in the gradient's dtype,
    summed in float64.
    """
    s = scale.detach().reshape(()).to(torch.float64)
    d, x = (d_img, img) if coef_row else (d_txt, txt)
    rows = (d * x.to(d.dtype)).sum(dim=1, dtype=torch.float64).sum()
    return torch.where(s != 0, rows / torch.where(s != 0, s, 1.0), d_scale.to(torch.float64)).to(d_scale.dtype)


def combine_diag(lse_off: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """float64 ``logaddexp(lse_off, diag)`` over the first len(diag) entries (see the contract)."""
    out = lse_off.to(torch.float64, copy=True)
    n = diag.shape[0]
    out[:n] = torch.logaddexp(out[:n], diag.to(torch.float64))
    return out


# SigLIP: tiny terms are summed scaled by 2^TINY_SHIFT (``clip_fast.siglip.backends``,
# numerics step 3).
TINY_SHIFT = 96.0


def siglip_block_meta(img, txt, need_grad: bool):
    """The shapes and dtypes ``siglip_block`` returns (loss, d_img, d_txt, d_scale, d_bias), for
    the Triton and CUDA ops' fake implementations: float64 sums, float32 gradients, and
    empty gradients when none is needed."""
    f32, f64 = torch.float32, torch.float64
    m = img.shape[0] if need_grad else 0
    k = txt.shape[0] if need_grad else 0
    return (img.new_empty((), dtype=f64), img.new_empty((m, img.shape[1]), dtype=f32),
            txt.new_empty((k, txt.shape[1]), dtype=f32), img.new_empty((), dtype=f64),
            img.new_empty((), dtype=f64))
