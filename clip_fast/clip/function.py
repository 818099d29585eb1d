"""The autograd.Function behind ``clip_loss`` and ``FastClipLoss`` (single process).  It
follows the rules every clip_fast Function follows (``clip_fast.core.autograd``): a fresh
forward output, a backward without autocast, gradients that refuse a second
differentiation and the shared backward tail.

forward:  backend.lse_forward  -> row/column log-sum-exp and the diagonal (float64, O(N))
          loss = (sum_i (lse_row_i - S_ii) + sum_i (lse_col_i - S_ii)) / (2N)
          formed from the per-pair terms, each >= 0 and accurate on its own, so a small
          loss is not the difference of two large sums.
backward: backend.grad_backward -> d_img, d_txt, d_scale from one recompute of each tile,
          with G = (P_row + P_col - 2I) / (2N) and G's diagonal taken from the forward's
          float64 terms (see ``clip_fast.clip.backends.diag_grad``).
Saved for backward: the inputs and three O(N) float64 vectors, nothing N x N.

Positive groups, label smoothing, direction weights and hard negatives
(``clip_fast.clip.targets``) add O(N * D) host terms and, for hard negatives, the sweeps of
their rectangular blocks (img x negative texts: rows only; negative images x txt:
columns only).

``logit_bias`` shifts every logit of every softmax equally and so cancels from the loss
exactly: it never enters the arithmetic (a bias of 1e3 would otherwise cost fp32 digits
of S), and its gradient is exactly 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import backends
from ..core.autograd import bias_guard, bias_meta, finish_grads, fresh_output, fused_backward, refuse_vmap
from ..core.numerics import compute_dtype
from ..core.registry import chunk_kwargs
from .targets import block_targets, group_counts


@dataclass(frozen=True)
class LossOptions:
    """Non-tensor options, passed to the Function as one hashable value."""
    backend: str  # a resolved backend name: "torch", "triton" or "cuda"
    chunk_size: Optional[int] = None  # rows per strip, torch backend only
    loss_dtype: Optional[torch.dtype] = None  # default: the features' dtype (float32 under autocast)
    # The target options of ``clip_fast.clip.targets``: plain floats, not a nested object, so
    # that torch.compile (2.11 included) can build the options inside a compiled region.
    label_smoothing: float = 0.0
    image_to_text_weight: float = 0.5

    def kwargs(self) -> dict:
        return chunk_kwargs(self.backend, self.chunk_size)


class ClipLossFunction(torch.autograd.Function):
    """Inputs: (img, txt, scale, bias, group_ids, neg_txt, neg_img, opts); the three
    optional tensors are None for open_clip's ``ClipLoss``."""

    @staticmethod
    def forward(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor], ids: Optional[torch.Tensor],
                neg_txt: Optional[torch.Tensor], neg_img: Optional[torch.Tensor],
                opts: LossOptions):
        impl = backends.get_loaded(opts.backend)
        acc = compute_dtype(img.dtype)
        s = scale  # already the backends' 0-d scalar (``clip_fast.core.checks.as_scalar_tensor``)
        plan = TargetPlan(img, txt, ids, neg_txt, neg_img, opts)
        lse_row, lse_col, diag = impl.lse_forward(img, txt, s, None, **opts.kwargs())
        # Hard negatives: their blocks' log-sum-exp partials join the row / column softmax.
        if plan.neg_txt is not None:
            lse_row = torch.logaddexp(lse_row, impl.lse_forward(img, plan.neg_txt, s, None, **opts.kwargs())[0])
        if plan.neg_img is not None:
            lse_col = torch.logaddexp(lse_col, impl.lse_forward(plan.neg_img, txt, s, None, **opts.kwargs())[1])
        a, b = plan.a, plan.b
        loss = a * (lse_row - diag).sum() + b * (lse_col - diag).sum()
        if not plan.plain:
            t, w_diag = plan.target_sums(img, txt, neg_txt, neg_img, acc)
            loss = loss + ((a + b - w_diag) * diag).sum() - s.to(torch.float64) * t
        loss = loss + bias_guard(bias)
        return fresh_output(loss, opts.loss_dtype or img.dtype), lse_row, lse_col, diag

    @staticmethod
    def setup_context(ctx, inputs, output):
        img, txt, scale, bias, ids, neg_txt, neg_img, opts = inputs
        _, lse_row, lse_col, diag = output
        ctx.save_for_backward(img, txt, scale, lse_row, lse_col, diag, ids, neg_txt, neg_img)
        ctx.opts = opts
        ctx.bias_meta = bias_meta(bias)
        ctx.mark_non_differentiable(lse_row, lse_col, diag)

    @staticmethod
    def _grads(ctx, grad_loss: torch.Tensor):
        img, txt, scale, lse_row, lse_col, diag, ids, neg_txt, neg_img = ctx.saved_tensors
        opts: LossOptions = ctx.opts
        impl = backends.get_loaded(opts.backend)
        acc = compute_dtype(img.dtype)
        s = scale
        plan = TargetPlan(img, txt, ids, neg_txt, neg_img, opts)
        a, b = plan.a, plan.b
        kw = opts.kwargs()
        if plan.plain:
            d_img, d_txt, d_scale = impl.grad_backward(img, txt, s, None, lse_row, lse_col,
                                                       a, b, a + b, diag=diag, **kw)
            out = finish_grads(d_img, d_txt, d_scale, grad_loss, img, txt, scale, ctx.bias_meta,
                               ctx.needs_input_grad)
            # Empty (or zero-weight) hard-negative blocks still give their inputs a zero gradient.
            return out[:4] + (None, _neg_grad(None, None, neg_txt, ctx.needs_input_grad[5]),
                              _neg_grad(None, None, neg_img, ctx.needs_input_grad[6])) + out[4:]
        qs = plan.target_grads(img, txt, neg_txt, neg_img, acc)
        d_img, d_txt, d_scale = impl.grad_backward(img, txt, s, None, lse_row, lse_col,
                                                   a, b, qs.w_diag, diag=diag, **kw)
        d_scale = d_scale.to(torch.float64) - qs.t
        if qs.img is not None:
            d_img.sub_(qs.img * s)
            d_txt.sub_(qs.txt * s)
        d_neg_txt = d_neg_img = None
        if plan.neg_txt is not None:  # block (img, neg_txt): the row softmax only
            di, d_neg_txt, ds = impl.grad_backward(img, plan.neg_txt, s, None, lse_row, None, a, 0.0, 0.0, **kw)
            d_img.add_(di)
            if qs.neg_txt is not None:
                d_neg_txt.sub_(qs.neg_txt * s)
            d_scale = d_scale + ds.to(torch.float64)
        if plan.neg_img is not None:  # block (neg_img, txt): the column softmax only
            d_neg_img, dt, ds = impl.grad_backward(plan.neg_img, txt, s, None, None, lse_col, 0.0, b, 0.0, **kw)
            d_txt.add_(dt)
            if qs.neg_img is not None:
                d_neg_img.sub_(qs.neg_img * s)
            d_scale = d_scale + ds.to(torch.float64)
        out = finish_grads(d_img, d_txt, d_scale.to(acc), grad_loss, img, txt, scale, ctx.bias_meta,
                           ctx.needs_input_grad)
        g = grad_loss.to(acc)
        extra = (None,  # group_ids
                 _neg_grad(d_neg_txt, g, neg_txt, ctx.needs_input_grad[5]),
                 _neg_grad(d_neg_img, g, neg_img, ctx.needs_input_grad[6]))
        return out[:4] + extra + out[4:]

    backward = fused_backward("clip_fast's CLIP loss", _grads.__func__)

    vmap = refuse_vmap("clip_fast's CLIP loss", "call it once per batch element, or stack the batches along N")


def _neg_grad(d, g, like, needed):
    """A hard-negative block's gradient, times the upstream gradient, in its input's dtype
    (zeros for an empty or skipped block whose features still want a gradient)."""
    if not needed or like is None:
        return None
    if d is None:
        return torch.zeros_like(like)
    return (d * g).to(like.dtype)


class TargetPlan:
    """One call's target terms (``clip_fast.clip.targets``): the weights a = lam / N and
    b = (1 - lam) / N, which blocks exist, and the O(N * D) host sums."""

    def __init__(self, img, txt, ids, neg_txt, neg_img, opts: LossOptions):
        n = img.shape[0]
        lam, eps = opts.image_to_text_weight, opts.label_smoothing
        self.n, self.eps, self.ids = n, eps, ids
        self.a, self.b = lam / n, (1.0 - lam) / n
        # A block whose softmax has weight 0 contributes nothing: it is skipped.
        self.neg_txt = neg_txt if neg_txt is not None and neg_txt.shape[0] and self.a else None
        self.neg_img = neg_img if neg_img is not None and neg_img.shape[0] and self.b else None
        self.inv_k_row = 1.0 / (n + (0 if neg_txt is None else neg_txt.shape[0]))
        self.inv_k_col = 1.0 / (n + (0 if neg_img is None else neg_img.shape[0]))
        self.plain = (eps == 0.0 and lam == 0.5 and ids is None and self.neg_txt is None
                      and self.neg_img is None)

    def _main(self, img, txt, acc):
        counts = None if self.ids is None else group_counts(self.ids)
        return block_targets(img.to(acc), txt.to(acc), a=self.a, b=self.b, eps=self.eps,
                             inv_k_row=self.inv_k_row, inv_k_col=self.inv_k_col, positives=True,
                             ids_x=self.ids, ids_y=self.ids, counts_x=counts, counts_y=counts,
                             pair_offset=0, kernel_diag=True)

    def _uniform(self, x, y, a, b, acc):
        return block_targets(x.to(acc), y.to(acc), a=a, b=b, eps=self.eps, inv_k_row=self.inv_k_row,
                             inv_k_col=self.inv_k_col, positives=False, pair_offset=None)

    def target_sums(self, img, txt, neg_txt, neg_img, acc):
        """(t, w_diag): sum_ij Q_ij <x_i, y_j> over every block, and the diagonal's target weights."""
        return self.target_grads(img, txt, neg_txt, neg_img, acc).sums()

    def target_grads(self, img, txt, neg_txt, neg_img, acc) -> "TargetGrads":
        if self.ids is None and not self.eps:
            # Direction weights and hard negatives alone: the only targets are the pairs,
            # all on the kernels' diagonal (weight a + b); nothing is left for the host.
            w_diag = torch.full((self.n,), self.a + self.b, dtype=torch.float64, device=img.device)
            return TargetGrads(img=None, txt=None, t=torch.zeros((), dtype=torch.float64,
                                                                   device=img.device), w_diag=w_diag)
        qx, qy, t, w_diag = self._main(img, txt, acc)
        out = TargetGrads(img=qx, txt=qy, t=t, w_diag=w_diag)
        if self.neg_txt is not None and self.eps:
            qi, out.neg_txt, tb, _ = self._uniform(img, self.neg_txt, self.a, 0.0, acc)
            out.img, out.t = out.img + qi, out.t + tb
        if self.neg_img is not None and self.eps:
            out.neg_img, qt, tc, _ = self._uniform(self.neg_img, txt, 0.0, self.b, acc)
            out.txt, out.t = out.txt + qt, out.t + tc
        return out


@dataclass
class TargetGrads:
    """Q @ y per row of every block's features (None: all zero), sum_ij Q_ij <x_i, y_j>,
    and w_diag."""
    img: Optional[torch.Tensor]
    txt: Optional[torch.Tensor]
    t: torch.Tensor
    w_diag: torch.Tensor
    neg_txt: Optional[torch.Tensor] = None
    neg_img: Optional[torch.Tensor] = None

    def sums(self):
        return self.t, self.w_diag
