"""Soft targets for the CLIP loss: positive groups, label smoothing, hard negatives and
direction weights, in O(N*D) beside the kernels' log-sum-exp sweeps.

The loss (one process; the distributed modes apply the same terms per block)
-----------------------------------------------------------------------------
Images I (N rows) and texts T (N rows) are paired; optional hard-negative texts T'
(M_t rows) join the columns of the image->text softmax and hard-negative images I'
(M_i rows) the rows of the text->image softmax.  With S = s * <x, y> (+ b):

    CE_row_i = lse_j(S_ij over T and T') - sum_j q_ij  S_ij      (image i -> texts)
    CE_col_j = lse_i(S_ij over I and I') - sum_i q'_ji S_ij      (text j -> images)
    loss     = lam / N * sum_i CE_row_i + (1 - lam) / N * sum_j CE_col_j

q_i is uniform over row i's positives P(i) = {j in T : id_j == id_i} (just {i} without
ids), smoothed as ``torch.nn.CrossEntropyLoss(label_smoothing=eps)`` smooths: over the
K_r = N + M_t classes of the row softmax,

    q_ij = (1 - eps) [j in P(i)] / c_i + eps / K_r,      c_i = |P(i)|

and q'_j likewise over K_c = N + M_i.  Every q sums to 1, so a bias b cancels from every
CE and never enters the arithmetic (its gradient is exactly 0).  lam = 0.5, eps = 0 and
no ids or negatives is CLIP (open_clip's ``ClipLoss``).

Everything beyond the log-sum-exp is linear in S
------------------------------------------------
With a = lam / N and b = (1 - lam) / N, the target part of the gradient is the matrix

    Q_ij = a q_ij + b q'_ji = (1 - eps)(a + b) [id_i == id_j] / c_g + eps (a / K_r + b / K_c)

on I x T (c_g: the size of the shared group; equal ids mean equal group sizes), eps a / K_r
on I x T' and eps b / K_c on I' x T.  Q is a group indicator plus a constant, so

    sum_j Q_ij y_j = (1 - eps)(a + b) / c_i * (sum of y over i's group) + u * sum_j y_j

needs group sums and column sums only: O(N * D).  The kernels keep computing only
P_row and P_col (``grad_backward`` with coef_row = a, coef_col = b), and the host
subtracts s * Q @ y from d_img, s * Q.T @ x from d_txt and sum_ij Q_ij <x_i, y_j> from
d_scale.

Exactness on the diagonal
-------------------------
Pair (i, i) stays with the kernels: its G_ii = a (P_row_ii - q_ii) + b (P_col_ii - q'_ii)
is formed from the forward's float64 loss terms as
``a expm1(S_ii - lse_row_i) + b expm1(S_ii - lse_col_i) + (a + b - w_i)`` with
w_i = a q_ii + b q'_ii (``backends.diag_grad`` with a per-row ``coef_diag``), so a
confident row keeps its accuracy.  The host's Q excludes the diagonal, and the loss is

    sum_i [a (lse_row_i - S_ii) + b (lse_col_i - S_ii)] + sum_i (a + b - w_i) S_ii
        - s * sum_{i != j} Q_ij <x_i, y_j>

whose first sum is the per-pair terms of the plain loss; the other two vanish exactly
(not by cancellation) when the targets are CLIP's.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def segments(ids: torch.Tensor) -> torch.Tensor:
    """A segment index in [0, len(ids)) per entry, equal exactly where the ids are equal.

    Static shapes (a sort and a cumulative sum, no ``torch.unique``), so it traces under
    ``torch.compile(fullgraph=True)``.
    """
    n = ids.shape[0]
    sorted_ids, perm = torch.sort(ids, stable=True)
    starts = torch.ones(n, dtype=torch.int64, device=ids.device)
    if n > 1:
        starts[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
    seg_sorted = torch.cumsum(starts, 0) - 1
    return torch.empty_like(seg_sorted).scatter_(0, perm, seg_sorted)


def group_counts(ids: torch.Tensor) -> torch.Tensor:
    """c_i = how many entries of ``ids`` equal ``ids[i]`` (float64)."""
    seg = segments(ids)
    cnt = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
    cnt.index_add_(0, seg, torch.ones_like(cnt))
    return cnt[seg]


def _group_sums(ids_x: torch.Tensor, ids_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(for each x row, the sum of the y rows with its id; for each y row, the x rows' sum)."""
    seg = segments(torch.cat([ids_x, ids_y]))
    seg_x, seg_y = seg[:ids_x.shape[0]], seg[ids_x.shape[0]:]
    size = seg.shape[0]
    y_table = y.new_zeros((size, y.shape[1])).index_add_(0, seg_y, y)
    x_table = x.new_zeros((size, x.shape[1])).index_add_(0, seg_x, x)
    return y_table[seg_x], x_table[seg_y]


def dot64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_i <x_i, y_i> as a float64 scalar: each row's dot in the inputs' dtype (D terms,
    as a materialised loss forms them), the N row dots summed in float64."""
    return (x * y).sum(1).to(torch.float64).sum()


def match_counts(ids_x: torch.Tensor, ids_y: torch.Tensor) -> torch.Tensor:
    """For each entry of ``ids_x``, how many entries of ``ids_y`` equal it (float64).

    Summed over every rank's ``ids_y`` it is the global group size c of each local id:
    the ring accumulates it as the ids travel.
    """
    seg = segments(torch.cat([ids_x, ids_y]))
    seg_x, seg_y = seg[:ids_x.shape[0]], seg[ids_x.shape[0]:]
    table = torch.zeros(seg.shape[0], dtype=torch.float64, device=ids_x.device)
    table.index_add_(0, seg_y, torch.ones(seg_y.shape[0], dtype=torch.float64, device=ids_x.device))
    return table[seg_x]


def positive_dots(x: torch.Tensor, y: torch.Tensor, ids_x: torch.Tensor, ids_y: torch.Tensor,
                  own: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One block's positive pairs, summed per row and per column, in float64.

    Returns ``(row, col)``: row_i = sum of <x_i, y_j> over the y rows j with x_i's id,
    col_j = sum of <x_i, y_j> over the x rows i with y_j's id; with ``own`` (the block
    pairs x_i with y_i) the pairs (i, i) are left out, as the kernels' diagonal carries
    them.  Summed over the blocks of a row (or column), and divided by the global group
    size, they are the positive part of that row's (column's) target sum without the
    full block: the ring's forward forms each rank's loss from them.
    """
    x64, y64 = x.to(torch.float64), y.to(torch.float64)
    ysum, xsum = _group_sums(ids_x, ids_y, x64, y64)
    if own:
        n = min(x.shape[0], y.shape[0])
        ysum[:n] -= y64[:n]
        xsum[:n] -= x64[:n]
    return (x64 * ysum).sum(1), (y64 * xsum).sum(1)


def block_targets(x: torch.Tensor, y: torch.Tensor, *, a: float, b: float, eps: float,
                  inv_k_row: float, inv_k_col: float, positives: bool,
                  ids_x: Optional[torch.Tensor] = None, ids_y: Optional[torch.Tensor] = None,
                  counts_x: Optional[torch.Tensor] = None, counts_y: Optional[torch.Tensor] = None,
                  pair_offset: Optional[int] = 0, kernel_diag: bool = False, diag_offset: int = 0,
                  split_t: bool = False):
    """The target part Q of one block (rows x, columns y), without the N x N matrix.

    ``Q_ij = w_pos [i, j positives] / c + u`` with ``w_pos = (1 - eps)(a + b)`` and
    ``u = eps (a * inv_k_row + b * inv_k_col)``.  Positives (``positives=True``) are the
    pairs with equal ids when ``ids_x``/``ids_y`` are given (``counts_*``: each id's group
    size, over the whole batch), else the paired entries (i, i + pair_offset).  With
    ``kernel_diag`` the pairs (i, i + diag_offset) are left out: the kernels' ``g_diag``
    (offset 0), or the caller's own label-logit terms (the gather mode's strips, whose
    pairs sit at the rank's row offset), carries them, and ``w_diag`` (their target weight
    per pair, in pair order) is returned for it.

    Returns ``(qx, qy, t, w_diag)``: qx = Q @ y (rows of x), qy = Q.T @ x (rows of y),
    t = sum_ij Q_ij <x_i, y_j> in float64, and w_diag (float64, or None).
    The caller subtracts s * qx and s * qy from the feature gradients, t from d_scale
    and s * t from the loss.  ``split_t``: t as a (2,) float64 tensor, [the part of the
    row weight a, the part of the column weight b] (for a block without a kernel diagonal),
    so a block whose rows and columns belong to two ranks' losses splits d_scale between them.
    """
    # Long by its docstring (the contract every caller relies on); the body is three steps:
    # the positives' part, the uniform part, and the optional split of t.
    m, k = x.shape[0], y.shape[0]
    w_pos = (1.0 - eps) * (a + b) if positives else 0.0
    u_row, u_col = eps * a * inv_k_row, eps * b * inv_k_col
    u = u_row + u_col
    lo, hi = (max(0, -diag_offset), min(m, k - diag_offset)) if kernel_diag else (0, 0)
    n_diag = max(0, hi - lo)
    rows, cols = slice(lo, lo + n_diag), slice(lo + diag_offset, lo + diag_offset + n_diag)
    qx = x.new_zeros((m, y.shape[1]))
    qy = y.new_zeros((k, x.shape[1]))
    w_diag = torch.zeros(n_diag, dtype=torch.float64, device=x.device) if n_diag else None
    if w_pos and ids_x is not None:
        ysum, xsum = _group_sums(ids_x, ids_y, x, y)
        if n_diag:  # the excluded pairs: out of the sums before scaling
            ysum[rows] -= y[cols]
            xsum[cols] -= x[rows]
            w_diag += w_pos / counts_x[rows]
        qx += ysum * (w_pos / counts_x).to(x.dtype)[:, None]
        qy += xsum * (w_pos / counts_y).to(y.dtype)[:, None]
    elif w_pos and kernel_diag and pair_offset == diag_offset:
        if n_diag:
            w_diag += w_pos
    elif w_pos and pair_offset is not None:
        lo_p, hi_p = max(0, -pair_offset), min(m, k - pair_offset)
        if hi_p > lo_p:
            qx[lo_p:hi_p] += w_pos * y[lo_p + pair_offset:hi_p + pair_offset]
            qy[lo_p + pair_offset:hi_p + pair_offset] += w_pos * x[lo_p:hi_p]
    t_pos = dot64(x, qx) if split_t else None
    if u:
        ycol, xcol = y.sum(0), x.sum(0)
        qx += u * ycol
        qy += u * xcol
        if n_diag:
            qx[rows] -= u * y[cols]
            qy[cols] -= u * x[rows]
            w_diag += u
    t = dot64(x, qx)
    if split_t:
        # Q = a * (row targets) + b * (column targets): the positive part splits as a : b,
        # the uniform part as u_row : u_col.
        t_uni = t - t_pos
        f_pos = a / (a + b) if a + b else 0.0
        f_uni = u_row / u if u else 0.0
        t = torch.stack([f_pos * t_pos + f_uni * t_uni, (1.0 - f_pos) * t_pos + (1.0 - f_uni) * t_uni])
    return qx, qy, t, w_diag
