"""The exact chunked PyTorch sweeps of the distillation term: any device, any floating dtype.

On one block, student ``S = scale * img @ txt.T`` and teacher ``T = tscale * timg @ ttxt.T``
(both (M, K), never materialised beyond a strip of C rows), with the float64 log-sum-exps
of both already known (``lse_forward`` of the backend contract in ``clip_fast.clip.backends``):

``distill_forward(...) -> (row_term, col_term)``, float64
    row_term_i = sum_j PT_row_ij (lse_row_i - S_ij),   PT_row = exp(T - tlse_row[:, None])
    col_term_j = sum_i PT_col_ij (lse_col_j - S_ij),   PT_col = exp(T - tlse_col[None, :])
    which is open_clip's ``-sum_j softmax(T)_ij log_softmax(S)_ij`` for each row (column).
    Every summand is >= 0, so a small term is never the difference of two large sums, which
    ``lse_S(i) - sum_j PT_ij S_ij`` would be at |S| ~ 100.  A term whose lse is None is None.

``distill_backward(...) -> (d_img, d_txt, d_scale, d_timg, d_ttxt, d_tscale)``
    With PS_row, PS_col the student's softmaxes and A_ij the student's lse minus S_ij:
        G_S = coef_row * (PS_row - PT_row) + coef_col * (PS_col - PT_col)
        G_T = coef_row * PT_row * (A_row - row_term_i) + coef_col * PT_col * (A_col - col_term_j)
    (G_T is d(term)/dT: the teacher's softmax depends on T, so a teacher that needs
    gradients gets them.)  d_img = scale * G_S @ txt, d_txt = scale * G_S.T @ img,
    d_scale = <G_S, img @ txt.T>, and the same for the teacher with G_T; the teacher's
    three are None when ``teacher_grad`` is False.  d_scale and d_tscale are reduced in
    float64.  Outputs are float32 (float64 for float64 inputs).

Each strip recomputes S and T once per sweep; half and bfloat16 inputs are upcast to
float32 for the strip GEMMs, as in ``clip_fast.clip.backends.torch_backend``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...clip.backends.torch_backend import hi_lo, strip_rows, unavailable_reason  # noqa: F401  (any device)
from ...core.numerics import compute_dtype

NAME = "torch"


def _prepare(img, txt, scale, timg, ttxt, tscale):
    cd = compute_dtype(img.dtype)
    return (cd, img.to(cd), txt.to(cd), scale.reshape(()).to(cd),
            timg.to(cd), ttxt.to(cd), tscale.reshape(()).to(cd))


def _row_p(logits: torch.Tensor, lse, r0: int, r1: int) -> torch.Tensor:
    return torch.sub(logits, lse[0][r0:r1, None]).sub_(lse[1][r0:r1, None]).exp_()


def _col_p(logits: torch.Tensor, lse) -> torch.Tensor:
    return torch.sub(logits, lse[0][None, :]).sub_(lse[1][None, :]).exp_()


def _gap_row(lse, logits: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """lse_i - S_ij as (hi - S) + lo: exact near the top of the row."""
    return torch.sub(lse[0][r0:r1, None], logits).add_(lse[1][r0:r1, None])


def _gap_col(lse, logits: torch.Tensor) -> torch.Tensor:
    return torch.sub(lse[0][None, :], logits).add_(lse[1][None, :])


@torch.no_grad()
def distill_forward(img, txt, scale, timg, ttxt, tscale, lse_row, lse_col, tlse_row, tlse_col,
                    chunk_size: Optional[int] = None
                    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    cd, x, y, s, tx, ty, t = _prepare(img, txt, scale, timg, ttxt, tscale)
    xs, txs = x * s, tx * t  # S as the CLIP torch backend's lse_forward forms it
    m, k = x.shape[0], y.shape[0]
    c = strip_rows(m, k, chunk_size)
    rows = hi_lo(lse_row, cd) if tlse_row is not None else None
    cols = hi_lo(lse_col, cd) if tlse_col is not None else None
    trows, tcols = hi_lo(tlse_row, cd), hi_lo(tlse_col, cd)
    row_term = torch.empty(m, dtype=torch.float64, device=x.device) if rows is not None else None
    col_term = torch.zeros(k, dtype=torch.float64, device=x.device) if cols is not None else None
    for r0 in range(0, m, c):
        r1 = min(r0 + c, m)
        # 1. One strip of each model's logits, rows r0:r1.
        s_strip = torch.mm(xs[r0:r1], y.T)
        t_strip = torch.mm(txs[r0:r1], ty.T)
        # 2. Rows are complete inside the strip.
        if rows is not None:
            term = _row_p(t_strip, trows, r0, r1).mul_(_gap_row(rows, s_strip, r0, r1))
            row_term[r0:r1] = term.sum(dim=1).to(torch.float64)
        # 3. Columns: this strip's share of every column, summed over strips in float64.
        if cols is not None:
            term = _col_p(t_strip, tcols).mul_(_gap_col(cols, s_strip))
            col_term += term.sum(dim=0).to(torch.float64)
        del s_strip, t_strip
    return row_term, col_term


@torch.no_grad()
def distill_backward(img, txt, scale, timg, ttxt, tscale, lse_row, lse_col, tlse_row, tlse_col,
                     row_term, col_term, coef_row: float, coef_col: float, teacher_grad: bool,
                     chunk_size: Optional[int] = None):
    cd, x, y, s, tx, ty, t = _prepare(img, txt, scale, timg, ttxt, tscale)
    xs, txs = x * s, tx * t
    m, k = x.shape[0], y.shape[0]
    c = strip_rows(m, k, chunk_size)
    rows, cols = hi_lo(lse_row, cd) if coef_row else None, hi_lo(lse_col, cd) if coef_col else None
    trows, tcols = hi_lo(tlse_row, cd) if coef_row else None, hi_lo(tlse_col, cd) if coef_col else None
    rt = row_term.to(cd) if coef_row and teacher_grad else None
    ct = col_term.to(cd) if coef_col and teacher_grad else None
    d_img, d_txt = torch.empty_like(x), torch.zeros_like(y)
    d_scale = torch.zeros((), dtype=torch.float64, device=x.device)
    d_timg = torch.empty_like(tx) if teacher_grad else None
    d_ttxt = torch.zeros_like(ty) if teacher_grad else None
    d_tscale = torch.zeros((), dtype=torch.float64, device=x.device) if teacher_grad else None
    for r0 in range(0, m, c):
        r1 = min(r0 + c, m)
        # 1. Recompute both strips once.
        s_strip = torch.mm(xs[r0:r1], y.T)
        t_strip = torch.mm(txs[r0:r1], ty.T)
        g_s = torch.zeros_like(s_strip)
        g_t = torch.zeros_like(t_strip) if teacher_grad else None
        # 2. G_S and G_T, one direction at a time.
        if coef_row:
            pt = _row_p(t_strip, trows, r0, r1)
            g_s.add_(_row_p(s_strip, rows, r0, r1).sub_(pt), alpha=coef_row)
            if teacher_grad:
                g_t.add_(pt.mul_(_gap_row(rows, s_strip, r0, r1).sub_(rt[r0:r1, None])), alpha=coef_row)
            del pt
        if coef_col:
            pt = _col_p(t_strip, tcols)
            g_s.add_(_col_p(s_strip, cols).sub_(pt), alpha=coef_col)
            if teacher_grad:
                g_t.add_(pt.mul_(_gap_col(cols, s_strip).sub_(ct[None, :])), alpha=coef_col)
            del pt
        del s_strip, t_strip
        # 3. The gradient GEMMs of each model from its own G; scale gradients in float64.
        #    d_scale = sum_i <(G_S @ txt)_i, img_i> (as in the CLIP torch backend).
        d_img[r0:r1] = torch.mm(g_s, y)
        d_scale += (d_img[r0:r1] * x[r0:r1]).sum(dim=1).sum(dtype=torch.float64)
        d_txt.addmm_(g_s.T, x[r0:r1])
        if teacher_grad:
            d_timg[r0:r1] = torch.mm(g_t, ty)
            d_tscale += (d_timg[r0:r1] * tx[r0:r1]).sum(dim=1).sum(dtype=torch.float64)
            d_ttxt.addmm_(g_t.T, tx[r0:r1])
        del g_s, g_t
    d_img.mul_(s)
    d_txt.mul_(s)
    if teacher_grad:
        d_timg.mul_(t)
        d_ttxt.mul_(t)
        d_tscale = d_tscale.to(cd)
    return d_img, d_txt, d_scale.to(cd), d_timg, d_ttxt, d_tscale
