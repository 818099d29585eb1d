"""Nested (Matryoshka) sweeps for the torch backend: the log-sum-exp and gradient of every
prefix size of one (M, K) block in one pass over the feature dimension (the single-process
loss sweeps the square block; the distributed modes sweep rectangular ones, whose
diagonal, of min(M, K) entries, holds the label pairs as in ``clip_fast.clip.backends``).

For sizes d_1 < ... < d_n (segments [d_{k-1}, d_k), d_0 = 0) size k's logits are

    S_k = (R_k * rs_k[:, None]) * c_k[None, :],      R_k = sum_{j <= k} x[:, seg_j] @ y[:, seg_j].T

with rs_k = scale / |x[:, :d_k]| and c_k = 1 / |y[:, :d_k]| when each prefix is
re-normalised, and, without re-normalisation, S_k = R_k itself on x = scale * img (the scale
folded into the rows before the GEMM, as the plain torch backend and the materialised loss
form it).  R_k is the running partial sum a GEMM over the K dimension holds after d_k
columns: each strip multiplies each segment once (the GEMM work of the largest size) and
takes size k's statistics when the running sum passes d_k (``torch_backend.strip_lse``:
the diagonal kept out of the sums, as the backend contract asks).

Backward.  With G_k the contract's gradient matrix of size k (``torch_backend.strip_grad``:
coefficients already weighted, diagonal from the forward's float64 terms) and
H_k = r_k[:, None] * G_k * c_k[None, :] (r_k = 1 / |x[:, :d_k]|; H_k = G_k without
re-normalisation), the gradient reaching the raw features through R is

    d_x[:, seg_j] = scale * (sum_{k >= j} H_k) @ y[:, seg_j]

so the sizes' H are summed from the largest down and each segment is again multiplied once.
d_scale = sum_i <d_x_i, x_i> / scale, formed before the multiplication by scale, contracts
G against the columns first (as ``scale_grad_from_rows`` argues).  The normalisation chain
needs, per size, u_k[i] = sum_j G_k[i, j] S_k[i, j] (= <f_i, d f_i> for the unit prefix f):
returned along rows and columns.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import combine_diag, compute_dtype, diag_grad
from .torch_backend import finish_lse, hi_lo, strip_grad, strip_lse, strip_rows


def _segments(dims: Sequence[int]) -> List[Tuple[int, int]]:
    return list(zip((0,) + tuple(dims[:-1]), dims))


def _size_logits(run: torch.Tensor, rs: Optional[torch.Tensor], c: Optional[torch.Tensor]) -> torch.Tensor:
    """One size's strip of logits from the running partial sum, by the same operations in
    the forward and the backward (the backward's S is the forward's bit for bit)."""
    if rs is None:
        return run.clone()
    return (run * rs[:, None]).mul_(c[None, :])


def multiply_down(h: List[torch.Tensor], segs, x: torch.Tensor, y: torch.Tensor, r0: int, r1: int,
                  d_x: torch.Tensor, d_y: torch.Tensor) -> None:
    """One strip's gradient GEMMs: d_x[r0:r1, seg_j] = (sum_{k >= j} H_k) @ y[:, seg_j] and
    d_y[:, seg_j] += (sum_{k >= j} H_k).T @ x[r0:r1, seg_j], the H (one per size, ``h``,
    consumed) summed from the largest size down so that each segment is multiplied once."""
    acc = h.pop()
    for j in range(len(segs) - 1, -1, -1):
        d0, d1 = segs[j]
        d_x[r0:r1, d0:d1] = torch.mm(acc, y[:, d0:d1])
        d_y[:, d0:d1].addmm_(acc.T, x[r0:r1, d0:d1])
        if j:
            acc.add_(h.pop())


@torch.no_grad()
def nested_lse_forward(x: torch.Tensor, y: torch.Tensor, dims: Sequence[int], rs: Optional[torch.Tensor],
                       c: Optional[torch.Tensor], chunk_size: Optional[int] = None):
    """(lse_row (n_sizes, M), lse_col (n_sizes, K), diag (n_sizes, min(M, K))), float64, of
    every size of the block.

    x: (M, D), y: (K, D) in the compute dtype (x = scale * img without re-normalisation);
    rs: (n_sizes, M) row and c: (n_sizes, K) column scalings, or both None (no re-normalisation).
    """
    cd = compute_dtype(x.dtype)
    m, n, sizes = x.shape[0], y.shape[0], len(dims)
    c_rows = strip_rows(m, n, chunk_size)
    lse_row = torch.empty(sizes, m, dtype=torch.float64, device=x.device)
    diag = torch.empty(sizes, min(m, n), dtype=cd, device=x.device)
    col_max = [torch.full((n,), float("-inf"), dtype=cd, device=x.device) for _ in dims]
    col_sum = [torch.zeros(n, dtype=cd, device=x.device) for _ in dims]
    for r0 in range(0, m, c_rows):
        r1 = min(r0 + c_rows, m)
        run = torch.zeros(r1 - r0, n, dtype=cd, device=x.device)
        for k, (d0, d1) in enumerate(_segments(dims)):
            # 1. The running partial sum passes d_k: size k's strip of logits.
            run.addmm_(x[r0:r1, d0:d1], y[:, d0:d1].T)
            strip = _size_logits(run, None if rs is None else rs[k, r0:r1], None if c is None else c[k])
            # 2-4. Its diagonal, row lse and column merge (torch_backend.lse_forward's steps).
            col_max[k] = strip_lse(strip, r0, diag[k], lse_row[k], col_max[k], col_sum[k])
            del strip
    out = []
    for k in range(sizes):
        row_off, col_off, diag64 = finish_lse(lse_row[k], col_max[k], col_sum[k], diag[k])
        out.append((combine_diag(row_off, diag64), combine_diag(col_off, diag64), diag64))
    return tuple(torch.stack(t) for t in zip(*out))


@torch.no_grad()
def nested_grad_backward(x_gemm: torch.Tensor, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor,
                         dims: Sequence[int], rs: Optional[torch.Tensor], r: Optional[torch.Tensor],
                         c: Optional[torch.Tensor], lse_row: torch.Tensor, lse_col: torch.Tensor,
                         diag: torch.Tensor, coefs: Tuple[Sequence, Sequence, Sequence],
                         chunk_size: Optional[int] = None):
    """(d_x, d_y, u_row, u_col, d_scale) of the weighted sum of the sizes' block losses.

    x_gemm: the forward's x (scale * x without re-normalisation); x: the features;
    r = rs / scale.  d_x, d_y: the gradient through R only (the scalings held fixed),
    compute dtype; u_row: (n_sizes, M), u_col: (n_sizes, K) float64; d_scale: 0-d float64.
    coefs = (coef_row, coef_col, coef_diag), each a per-size sequence of the contract's
    coefficients (coef_diag[k] a float or a float64 (N,) vector).
    """
    cd = compute_dtype(x.dtype)
    m, n, sizes = x.shape[0], y.shape[0], len(dims)
    segs = _segments(dims)
    # Every size's G of one strip is alive at once (summed from the largest down): the
    # strip budget is shared by the sizes.
    c_rows = strip_rows(m, n * sizes, chunk_size)
    d_x = torch.zeros_like(x)
    d_y = torch.zeros_like(y)
    u_row = torch.zeros(sizes, m, dtype=torch.float64, device=x.device)
    u_col = torch.zeros(sizes, n, dtype=torch.float64, device=x.device)
    g_diag = [diag_grad(lse_row[k], lse_col[k], diag[k], coefs[0][k], coefs[1][k], coefs[2][k]).to(cd)
              for k in range(sizes)]
    rows = [hi_lo(lse_row[k], cd) for k in range(sizes)]
    cols = [hi_lo(lse_col[k], cd) for k in range(sizes)]
    for r0 in range(0, m, c_rows):
        r1 = min(r0 + c_rows, m)
        run = torch.zeros(r1 - r0, n, dtype=cd, device=x.device)
        h = []
        for k, (d0, d1) in enumerate(segs):
            # 1. Size k's strip, recomputed as the forward formed it.
            run.addmm_(x_gemm[r0:r1, d0:d1], y[:, d0:d1].T)
            logits = _size_logits(run, None if rs is None else rs[k, r0:r1], None if c is None else c[k])
            # 2. G_k, then H_k = r_k G_k c_k and the chain sums u_k = G_k * S_k along rows and
            #    columns, formed from the running sum as (G_k c_k * R) rs_k: no copy of S_k.
            grad = strip_grad(logits, r0, rows[k], cols[k], coefs[0][k], coefs[1][k], coefs[2][k], g_diag[k])
            del logits
            if rs is not None:
                grad.mul_(c[k][None, :])
                prod = grad * run
                u_row[k, r0:r1] = prod.sum(dim=1).to(torch.float64) * rs[k, r0:r1].to(torch.float64)
                u_col[k] += torch.mv(prod.T, rs[k, r0:r1]).to(torch.float64)
                del prod
                grad.mul_(r[k, r0:r1, None])
            h.append(grad)
        # 3. From the largest size down: the running sum of H multiplies each segment once.
        multiply_down(h, segs, x, y, r0, r1, d_x, d_y)
    d_scale = (d_x * x).sum(dim=1, dtype=torch.float64).sum()
    return d_x.mul_(s), d_y.mul_(s), u_row, u_col, d_scale
