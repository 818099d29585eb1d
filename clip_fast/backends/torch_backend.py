"""The exact chunked PyTorch backend: any device, any floating dtype, O(N*D) memory.

It sweeps strips of ``C`` rows of ``S = scale * img @ txt.T + bias``; a strip is
(C, K) and is freed before the next one, so memory is O(C*K + (M + K)*D) and
never M x K.  It is the fallback where Triton and the CUDA extension are missing,
and the backend the fused kernels are checked against.

Precision: half and bfloat16 inputs are upcast to float32 for the strip GEMMs, so S
is accumulated and rounded in float32 exactly as in the fused kernels; float64
inputs stay float64 (this is what makes ``torch.autograd.gradcheck`` possible).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(img, txt, scale, bias):
    cd = _compute_dtype(img.dtype)
    x, y = img.to(cd), txt.to(cd)  # a copy only for half/bfloat16 inputs: O(N*D)
    s = scale.reshape(()).to(cd)
    b = None if bias is None else bias.reshape(()).to(cd)
    return cd, x, y, s, b


def _diag_len(r0: int, r1: int, k: int) -> int:
    """How many of rows r0..r1 have their diagonal element S[i, i] inside a K-column block."""
    return max(0, min(r1, k) - r0)


@torch.no_grad()
def lse_forward(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cd, x, y, s, b = _prepare(img, txt, scale, bias)
    m, k = x.shape[0], y.shape[0]
    c = strip_rows(m, k, chunk_size)
    lse_row = torch.empty(m, dtype=cd, device=x.device)
    diag = torch.empty(min(m, k), dtype=cd, device=x.device)
    # Running column statistics: max and sum of exp(S - max), merged strip by strip.
    col_max = torch.full((k,), float("-inf"), dtype=cd, device=x.device)
    col_sum = torch.zeros(k, dtype=cd, device=x.device)
    for r0 in range(0, m, c):
        r1 = min(r0 + c, m)
        # 1. One strip of logits, S[r0:r1, :].
        strip = torch.mm(x[r0:r1], y.T).mul_(s)
        if b is not None:
            strip.add_(b)
        # 2. Rows are complete inside the strip: exact row log-sum-exp.
        lse_row[r0:r1] = torch.logsumexp(strip, dim=1)
        # 3. The diagonal S[i, i] for the rows of this strip.
        n_diag = _diag_len(r0, r1, k)
        if n_diag:
            diag[r0:r0 + n_diag] = torch.diagonal(strip, offset=r0)[:n_diag]
        # 4. Columns: online merge, rescaling the old sum to the new running max.
        new_max = torch.maximum(col_max, strip.amax(dim=0))
        col_sum.mul_(torch.exp(col_max - new_max))
        col_sum.add_(strip.sub_(new_max).exp_().sum(dim=0))
        col_max = new_max
        del strip
    lse_col = col_max + torch.log(col_sum)
    return lse_row, lse_col, diag


@torch.no_grad()
def grad_backward(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                  bias: Optional[torch.Tensor], lse_row: Optional[torch.Tensor],
                  lse_col: Optional[torch.Tensor], coef_row: float, coef_col: float,
                  coef_diag: float, chunk_size: Optional[int] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cd, x, y, s, b = _prepare(img, txt, scale, bias)
    m, k = x.shape[0], y.shape[0]
    c = strip_rows(m, k, chunk_size)
    d_img = torch.empty_like(x)
    d_txt = torch.zeros_like(y)
    d_scale = torch.zeros((), dtype=cd, device=x.device)
    for r0 in range(0, m, c):
        r1 = min(r0 + c, m)
        # 1. Recompute the strip once: raw = img @ txt.T, S = scale * raw + bias.
        raw = torch.mm(x[r0:r1], y.T)
        logits = raw * s
        if b is not None:
            logits.add_(b)
        # 2. G = coef_row * P_row + coef_col * P_col - coef_diag * I, built in place.
        if coef_row:
            grad = torch.sub(logits, lse_row[r0:r1, None].to(cd)).exp_().mul_(coef_row)
            if coef_col:
                grad.add_(logits.sub_(lse_col[None, :].to(cd)).exp_(), alpha=coef_col)
        elif coef_col:
            grad = logits.sub_(lse_col[None, :].to(cd)).exp_().mul_(coef_col)
        else:
            grad = torch.zeros_like(logits)
        n_diag = _diag_len(r0, r1, k)
        if n_diag and coef_diag:
            torch.diagonal(grad, offset=r0)[:n_diag] -= coef_diag
        del logits
        # 3. Both directions' gradients from the same G; d_scale = <G, raw>.
        d_scale += torch.dot(grad.reshape(-1), raw.reshape(-1))
        del raw
        d_img[r0:r1] = torch.mm(grad, y)
        d_txt.addmm_(grad.T, x[r0:r1])
        del grad
    d_img.mul_(s)
    d_txt.mul_(s)
    return d_img, d_txt, d_scale
