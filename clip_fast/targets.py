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

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class Targets:
    """The non-tensor target options of one call (hashable; part of ``LossOptions``)."""
    label_smoothing: float = 0.0
    image_to_text_weight: float = 0.5

    @property
    def plain(self) -> bool:
        """Whether these are CLIP's own targets (no smoothing, equal direction weights)."""
        return self.label_smoothing == 0.0 and self.image_to_text_weight == 0.5


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


def block_targets(x: torch.Tensor, y: torch.Tensor, *, a: float, b: float, eps: float,
                  inv_k_row: float, inv_k_col: float, positives: bool,
                  ids_x: Optional[torch.Tensor] = None, ids_y: Optional[torch.Tensor] = None,
                  counts_x: Optional[torch.Tensor] = None, counts_y: Optional[torch.Tensor] = None,
                  pair_offset: Optional[int] = 0, kernel_diag: bool = False):
    """The target part Q of one block (rows x, columns y), without the N x N matrix.

    ``Q_ij = w_pos [i, j positives] / c + u`` with ``w_pos = (1 - eps)(a + b)`` and
    ``u = eps (a * inv_k_row + b * inv_k_col)``.  Positives (``positives=True``) are the
    pairs with equal ids when ``ids_x``/``ids_y`` are given (``counts_*``: each id's group
    size, over the whole batch), else the paired entries (i, i + pair_offset).  With
    ``kernel_diag`` the pairs (i, i) are left out: the kernels' ``g_diag`` carries them,
    and ``w_diag`` (their target weight per row) is returned for it.

    Returns ``(qx, qy, t, w_diag)``: qx = Q @ y (rows of x), qy = Q.T @ x (rows of y),
    t = sum_ij Q_ij <x_i, y_j> in float64, and w_diag (float64, or None).
    The caller subtracts s * qx and s * qy from the feature gradients, t from d_scale
    and s * t from the loss.
    """
    m, k = x.shape[0], y.shape[0]
    w_pos = (1.0 - eps) * (a + b) if positives else 0.0
    u = eps * (a * inv_k_row + b * inv_k_col)
    n_diag = min(m, k) if kernel_diag else 0
    qx = x.new_zeros((m, y.shape[1]))
    qy = y.new_zeros((k, x.shape[1]))
    w_diag = torch.zeros(n_diag, dtype=torch.float64, device=x.device) if n_diag else None
    if w_pos and ids_x is not None:
        ysum, xsum = _group_sums(ids_x, ids_y, x, y)
        if n_diag:  # the pairs (i, i) belong to g_diag: out of the sums before scaling
            ysum[:n_diag] -= y[:n_diag]
            xsum[:n_diag] -= x[:n_diag]
            w_diag += w_pos / counts_x[:n_diag]
        qx += ysum * (w_pos / counts_x).to(x.dtype)[:, None]
        qy += xsum * (w_pos / counts_y).to(y.dtype)[:, None]
    elif w_pos and kernel_diag and pair_offset == 0:
        w_diag += w_pos
    elif w_pos and pair_offset is not None:
        lo, hi = max(0, -pair_offset), min(m, k - pair_offset)
        if hi > lo:
            qx[lo:hi] += w_pos * y[lo + pair_offset:hi + pair_offset]
            qy[lo + pair_offset:hi + pair_offset] += w_pos * x[lo:hi]
    if u:
        ycol, xcol = y.sum(0), x.sum(0)
        qx += u * ycol
        qy += u * xcol
        if n_diag:
            qx[:n_diag] -= u * y[:n_diag]
            qy[:n_diag] -= u * x[:n_diag]
            w_diag += u
    t = (x.to(torch.float64) * qx.to(torch.float64)).sum()
    return qx, qy, t, w_diag
