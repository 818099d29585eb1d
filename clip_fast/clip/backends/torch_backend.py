"""The exact chunked PyTorch backend: any device, any floating dtype, O(N*D) memory.

It sweeps strips of ``C`` rows of ``S = scale * img @ txt.T + bias``; a strip is
(C, K) and is freed before the next one, so memory is O(C*K + (M + K)*D) and
never M x K.  It is the fallback where Triton and the CUDA extension are missing,
and the backend the fused kernels are checked against.

Precision: half and bfloat16 inputs are upcast to float32 for the strip GEMMs, so S
is accumulated and rounded in float32 exactly as in the fused kernels; float64
inputs stay float64 (this is what makes ``torch.autograd.gradcheck`` possible).
As the contract in ``clip_fast.clip.backends`` asks, the diagonal is kept out of the row
and column sums and added back in float64, and d_scale is reduced in float64.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import combine_diag, compute_dtype, compute_scalar, diag_coef_scalar, diag_grad, split_float

NAME = "torch"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Elements per (C, K) strip: 2**22 float32 = 16 MiB, a few strips live at once.
_STRIP_ELEMS = 1 << 22
_MIN_ROWS, _MAX_ROWS = 16, 1024


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if dtype not in _DTYPES:
        return f"dtype {dtype} is not a floating dtype the torch backend supports ({_DTYPES})"
    return None


def strip_rows(m: int, k: int, chunk_size: Optional[int] = None) -> int:
    """Rows per strip: the user's ``chunk_size``, else as many as fit ``_STRIP_ELEMS``."""
    if chunk_size is not None:
        return max(1, min(int(chunk_size), m))
    return max(1, min(m, max(_MIN_ROWS, min(_MAX_ROWS, _STRIP_ELEMS // max(k, 1)))))


def _prepare(img, txt, scale, bias):
    cd = compute_dtype(img.dtype)
    x, y = img.to(cd), txt.to(cd)  # a copy only for half/bfloat16 inputs: O(N*D)
    s = compute_scalar(scale, cd)
    # S = (scale * img) @ txt.T, the scale folded into the rows before the GEMM (one O(N*D)
    # product), as the materialised loss forms its logits: with the same GEMM, every S is
    # rounded as PyTorch's own loss rounds it, so where one logit decides an error (a near
    # tie) both carry the same rounding instead of two independent ones.
    return cd, x, x * s, y, s, compute_scalar(bias, cd)


def _strip_diag(strip: torch.Tensor, r0: int, k: int) -> torch.Tensor:
    """The view of a strip's diagonal entries S[i, i] (rows r0.. of the strip, i < K)."""
    return torch.diagonal(strip, offset=r0)[:max(0, min(strip.shape[0] + r0, k) - r0)]


@torch.no_grad()
def lse_forward(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lse_row, lse_col, diag = lse_forward_offdiag(img, txt, scale, bias, chunk_size)
    return combine_diag(lse_row, diag), combine_diag(lse_col, diag), diag


@torch.no_grad()
def lse_forward_offdiag(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lse_forward`` before the diagonal is added back: the row and column log-sum-exp of
    the off-diagonal entries (-inf for a row or column with none), and the diagonal."""
    cd, _, xs, y, s, b = _prepare(img, txt, scale, bias)
    m, k = xs.shape[0], y.shape[0]
    c = strip_rows(m, k, chunk_size)
    lse_row = torch.empty(m, dtype=torch.float64, device=xs.device)
    diag = torch.empty(min(m, k), dtype=cd, device=xs.device)
    # Running column statistics of the off-diagonal entries: max and sum of exp(S - max),
    # merged strip by strip.
    col_max = torch.full((k,), float("-inf"), dtype=cd, device=xs.device)
    col_sum = torch.zeros(k, dtype=cd, device=xs.device)
    for r0 in range(0, m, c):
        r1 = min(r0 + c, m)
        # 1. One strip of logits, S[r0:r1, :].
        strip = torch.mm(xs[r0:r1], y.T)
        if b is not None:
            strip.add_(b)
        col_max = strip_lse(strip, r0, diag, lse_row, col_max, col_sum)
        del strip
    return finish_lse(lse_row, col_max, col_sum, diag)


def strip_lse(strip: torch.Tensor, r0: int, diag: torch.Tensor, lse_row: torch.Tensor,
              col_max: torch.Tensor, col_sum: torch.Tensor) -> torch.Tensor:
    """Steps 2-4 of ``lse_forward`` on one strip S[r0:r1, :] (overwritten): its diagonal into
    ``diag``, its rows' off-diagonal lse into ``lse_row``, its columns merged into the running
    (``col_max``, ``col_sum``, the latter in place). Returns the new ``col_max``."""
    k, r1 = strip.shape[1], r0 + strip.shape[0]
    # 2. The diagonal S[i, i] of this strip's rows, then out of the sums (-inf).
    on_diag = _strip_diag(strip, r0, k)
    diag[r0:r0 + on_diag.shape[0]] = on_diag
    on_diag.fill_(float("-inf"))
    # 3. Rows are complete inside the strip: row log-sum-exp of the off-diagonal part,
    #    as max + log(sum exp(S - max)) with the sum's log taken in float64 (one fp32
    #    lse would round away a dominated row's small log(sum)).
    row_max = strip.amax(dim=1, keepdim=True)
    ref = torch.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = torch.sub(strip, ref).exp_().sum(dim=1)
    lse_row[r0:r1] = ref.squeeze(1).to(torch.float64) + torch.log(row_sum.to(torch.float64))
    # 4. Columns: online merge, rescaling the old sum to the new running max (a
    #    column with no finite entry yet keeps max -inf and sum 0).
    new_max = torch.maximum(col_max, strip.amax(dim=0))
    ref = torch.where(new_max == float("-inf"), 0.0, new_max)
    col_sum.mul_(torch.exp(col_max - ref))
    col_sum.add_(strip.sub_(ref).exp_().sum(dim=0))
    return new_max


def finish_lse(lse_row: torch.Tensor, col_max: torch.Tensor, col_sum: torch.Tensor, diag: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lse_forward_offdiag``'s (lse_row, lse_col, diag) from the off-diagonal row lse, the
    column running statistics and the diagonal: the diagonal not yet added back, all float64."""
    lse_col = torch.where(col_max == float("-inf"), col_max,
                          col_max.to(torch.float64) + torch.log(col_sum.to(torch.float64)))
    return lse_row, lse_col, diag.to(torch.float64)


def hi_lo(lse: Optional[torch.Tensor], cd: torch.dtype):
    """float64 lse as (hi, lo) in the compute dtype; hi alone (lo = 0) for float64."""
    if lse is None:
        return None
    if cd == torch.float64:
        return lse.to(cd), torch.zeros_like(lse, dtype=cd)
    return split_float(lse.to(torch.float64))


@torch.no_grad()
def grad_backward(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                  bias: Optional[torch.Tensor], lse_row: Optional[torch.Tensor],
                  lse_col: Optional[torch.Tensor], coef_row: float, coef_col: float,
                  coef_diag: float, diag: Optional[torch.Tensor] = None,
                  chunk_size: Optional[int] = None, split_scale: bool = False
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cd, x, xs, y, s, b = _prepare(img, txt, scale, bias)
    m, k = x.shape[0], y.shape[0]
    c = strip_rows(m, k, chunk_size)
    d_img = torch.empty_like(x)
    d_txt = torch.zeros_like(y)
    d_scale = torch.zeros((), dtype=torch.float64, device=x.device)
    # With split_scale, the row term's share of d_scale (off the diagonal G takes from
    # ``diag``/``coef_diag``), accumulated on its own.
    d_scale_row = torch.zeros((), dtype=torch.float64, device=x.device)
    g_diag = None if diag is None else diag_grad(lse_row, lse_col, diag, coef_row, coef_col,
                                                 coef_diag).to(cd)
    # Each lse as (hi, lo) in the compute dtype: P = exp((S - hi) - lo) keeps a dominant
    # entry's P = exp(-small) exact (S - hi is exact near the top), see kernel_lse.
    rows = hi_lo(lse_row, cd)
    cols = hi_lo(lse_col, cd)
    for r0 in range(0, m, c):
        r1 = min(r0 + c, m)
        # 1. Recompute the strip once, as the forward formed it: S = (scale * img) @ txt.T + bias.
        logits = torch.mm(xs[r0:r1], y.T)
        if b is not None:
            logits.add_(b)
        # 2. G = coef_row * P_row + coef_col * P_col - coef_diag * I, built in place.
        row_hook = None
        if split_scale:  # the row term alone, its diagonal left to the rest
            def row_hook(row_grad, r0=r0, r1=r1):
                nonlocal d_scale_row
                row_part = row_grad.mul(torch.mm(x[r0:r1], y.T))
                if g_diag is not None:
                    _strip_diag(row_part, r0, k).zero_()
                d_scale_row += row_part.sum(dim=1).sum(dtype=torch.float64)
        grad = strip_grad(logits, r0, rows, cols, coef_row, coef_col, coef_diag, g_diag, row_hook)
        del logits
        # 3. Both directions' gradients from the same G; d_scale = <G, raw> = sum_i
        #    <(G @ txt)_i, img_i>: the contraction over the columns first, as the
        #    materialised loss's autograd forms it (G's rows sum to ~0, and G @ txt keeps
        #    that cancellation inside one GEMM), the row dots summed in float64.
        d_img[r0:r1] = torch.mm(grad, y)
        if coef_row:
            d_scale += (d_img[r0:r1] * x[r0:r1]).sum(dim=1).sum(dtype=torch.float64)
        d_txt.addmm_(grad.T, x[r0:r1])
        del grad
    if not coef_row:
        # A column-only G sums to ~0 down each column: contract over the rows first.
        d_scale = (d_txt * y).sum(dim=1, dtype=torch.float64).sum()
    d_img.mul_(s)
    d_txt.mul_(s)
    if split_scale:
        return d_img, d_txt, torch.stack([d_scale_row, d_scale - d_scale_row]).to(cd)
    return d_img, d_txt, d_scale.to(cd)


def strip_grad(logits: torch.Tensor, r0: int, rows, cols, coef_row: float, coef_col: float,
               coef_diag, g_diag: Optional[torch.Tensor], row_hook=None) -> torch.Tensor:
    """Step 2 of ``grad_backward`` on one strip of logits S[r0:r1, :] (overwritten):
    G = coef_row * P_row + coef_col * P_col - coef_diag * I, with ``rows``/``cols`` the
    (hi, lo) lse of ``hi_lo`` and G's diagonal from ``g_diag`` (the forward's float64 terms)
    when given.  ``row_hook(G)`` sees the row term alone before the column term joins."""
    r1, k = r0 + logits.shape[0], logits.shape[1]
    if coef_row:
        grad = (torch.sub(logits, rows[0][r0:r1, None]).sub_(rows[1][r0:r1, None])
                .exp_().mul_(coef_row))
        if row_hook is not None:
            row_hook(grad)
        if coef_col:
            grad.add_(logits.sub_(cols[0][None, :]).sub_(cols[1][None, :]).exp_(), alpha=coef_col)
    elif coef_col:
        grad = logits.sub_(cols[0][None, :]).sub_(cols[1][None, :]).exp_().mul_(coef_col)
    else:
        grad = torch.zeros_like(logits)
    on_diag = _strip_diag(grad, r0, k)
    if g_diag is not None:
        on_diag.copy_(g_diag[r0:r0 + on_diag.shape[0]])
    elif coef_diag:
        on_diag -= diag_coef_scalar(coef_diag)
    return grad
