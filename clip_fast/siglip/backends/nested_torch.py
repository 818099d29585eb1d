"""Nested (Matryoshka) SigLIP for the torch backend: the weighted sum of the sigmoid loss of
every prefix size of one block, and its gradients, in one pass over the feature dimension.

For sizes d_1 < ... < d_n (segments [d_{k-1}, d_k), d_0 = 0) size k's logits are

    S_k = scale * r_k[:, None] * R_k * c_k[None, :] + bias,   R_k = sum_{j <= k} img[:, seg_j] @ txt[:, seg_j].T

with r_k = 1 / |img[:, :d_k]| and c_k = 1 / |txt[:, :d_k]| when each prefix is re-normalised
(``clip_fast.core.matryoshka.scalings``), and r = c = 1 without re-normalisation.  R_k is the
running partial sum a GEMM over the K dimension holds after d_k columns: each strip multiplies
each segment once (the GEMM work of the largest size) and turns size k's strip of S_k into its
loss terms and G_k (``torch_backend.strip_terms``: the contract's numerics) as the running sum
passes d_k.  The sigmoid loss has no normaliser, so the gradients come from the same sweep.

Gradients.  With G_k the contract's dL_k / dS_k and H_k = w_k r_k[:, None] G_k c_k[None, :],
the gradient reaching the raw features through R is

    d_img[:, seg_j] = scale * (sum_{k >= j} H_k) @ txt[:, seg_j]     (d_txt likewise)

so the sizes' H are summed from the largest down and each segment is again multiplied once.
d_bias = sum_k w_k sum G_k; d_scale = sum_k sum_ij H_k R_k.  The prefix normalisation adds,
per size, the chain  d_img[:, :d_k] -= r_k f_k u_k  with f_k the unit prefix and
u_k[i] = <f_i, d f_i> = sum_j w_k G_k[i, j] (S_k - bias)[i, j] (columns alike), formed from the
running sum as rs_k * sum_j (w_k G_k c_k) R_k without a copy of S (``core.matryoshka.chain``).
The chain is applied here, so the returned gradients are those of the raw features and the
block keeps the SigLIP backend contract (``clip_fast.siglip.backends``): the single-process
and the distributed losses take it in place of ``siglip_block``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...clip.backends.nested_torch import _segments, _size_logits, multiply_down
from ...core.matryoshka import NestedOptions, chains, scalings
from ...core.numerics import compute_dtype
from .torch_backend import siglip_strip_rows, strip_terms


@torch.no_grad()
def nested_siglip_block(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                        bias: Optional[torch.Tensor], ids_row: Optional[torch.Tensor],
                        ids_col: Optional[torch.Tensor], diag_positive: bool, need_grad: bool,
                        nested: NestedOptions, chunk_size: Optional[int] = None):
    """``siglip_block``'s contract for loss_sum = sum_k w_k * block loss of size k (module doc):
    (loss_sum, d_img, d_txt, d_scale, d_bias), the gradients of the raw features."""
    cd, f64 = compute_dtype(img.dtype), torch.float64
    x, y = img.to(cd), txt.to(cd)  # a copy only for half/bfloat16 inputs: O(N*D)
    s = scale.reshape(()).to(cd)
    b = None if bias is None else bias.reshape(()).to(cd)
    dims, renorm = nested.dims, nested.renormalize
    (r64, live_r), (c64, live_c) = scalings(x, dims, renorm), scalings(y, dims, renorm)
    # The scalings rounded once to the compute dtype, scale * r formed in float64.
    rs, r, c = (r64 * s.to(f64)).to(cd), r64.to(cd), c64.to(cd)
    m, k, sizes = x.shape[0], y.shape[0], len(dims)
    sw = _SizeGrads(m, k, sizes, x.device)
    d_img = torch.zeros_like(x) if need_grad else x.new_empty((0, x.shape[1]))  # columns past d_n: 0
    d_txt = torch.zeros_like(y) if need_grad else y.new_empty((0, y.shape[1]))
    loss = torch.zeros((), dtype=f64, device=x.device)
    # Every size's H of one strip is alive at once (summed from the largest down): the strip
    # budget is shared by the sizes.
    rows = siglip_strip_rows(m, k * (sizes if need_grad else 1), chunk_size)
    segs = _segments(dims)
    for r0 in range(0, m, rows):
        r1 = min(r0 + rows, m)
        run = torch.zeros(r1 - r0, k, dtype=cd, device=x.device)
        h = []
        for q, (d0, d1) in enumerate(segs):
            # 1. The running partial sum passes d_q: size q's strip of S.
            run.addmm_(x[r0:r1, d0:d1], y[:, d0:d1].T)
            logits = _size_logits(run, rs[q, r0:r1], c[q]) if renorm else run * s
            if b is not None:
                logits += b
            # 2-4. Its loss terms and G (the contract's numerics).
            strip_loss, grad = strip_terms(logits, r0, ids_row, ids_col, diag_positive, need_grad)
            del logits
            loss += nested.weights[q] * strip_loss
            if need_grad:
                h.append(sw.add(grad.mul_(nested.weights[q]), run, q, r0, r1, r if renorm else None,
                                c if renorm else None, r64, s))
        if need_grad:
            # 5. From the largest size down: the running sum of H multiplies each segment once.
            multiply_down(h, segs, x, y, r0, r1, d_img, d_txt)
    if not need_grad:
        return loss, d_img, d_txt, sw.d_scale, sw.d_bias
    d_img.mul_(s)
    d_txt.mul_(s)
    # 6. Each size's normalisation chain (nothing without re-normalisation).
    chains(d_img, d_txt, x, y, nested, (r64, live_r), (c64, live_c), sw.u_row, sw.u_col)
    return loss, d_img, d_txt, sw.d_scale, sw.d_bias


class _SizeGrads:
    """The float64 sums of the sizes' gradients: d_scale, d_bias and the chain's u_row, u_col."""

    def __init__(self, m: int, k: int, sizes: int, device: torch.device):
        f64 = torch.float64
        self.d_scale = torch.zeros((), dtype=f64, device=device)
        self.d_bias = torch.zeros((), dtype=f64, device=device)
        self.u_row = torch.zeros(sizes, m, dtype=f64, device=device)
        self.u_col = torch.zeros(sizes, k, dtype=f64, device=device)

    def add(self, grad, run, q, r0, r1, r, c, r64, s) -> torch.Tensor:
        """Size q's strip of w_q G_q (overwritten): its sums, and H_q = r_q G_q c_q."""
        f64 = torch.float64
        self.d_bias += grad.sum(dim=1).sum(dtype=f64)
        if r is None:  # no re-normalisation: H = G, d_scale = sum G R
            self.d_scale += torch.mul(grad, run).sum(dim=1).sum(dtype=f64)
            return grad
        grad.mul_(c[q][None, :])
        prod = grad * run  # (G c) R: S - bias = scale r (G c) R, no copy of S
        rows64 = prod.sum(dim=1).to(f64) * r64[q, r0:r1]
        self.d_scale += rows64.sum()
        self.u_row[q, r0:r1] = rows64 * s.to(f64)
        self.u_col[q] += torch.mv(prod.T, r[q, r0:r1]).to(f64) * s.to(f64)
        del prod
        return grad.mul_(r[q, r0:r1, None])
