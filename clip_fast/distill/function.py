"""The autograd Function of the distillation term over one block of S and T (the steps are
numbered in ``clip_fast.distill``'s doc)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..clip import backends as clip_backends
from ..core.autograd import apply_function, autocast_off, first_order_only, fresh_output
from ..core.registry import chunk_kwargs
from . import backends as distill_backends


@dataclass(frozen=True)
class DistillOptions:
    """Non-tensor options of one block: which directions it carries and how they are averaged."""
    backend: str  # "torch" or "triton", resolved
    rows: bool  # the block's rows are loss rows (logits_per_image)
    cols: bool  # the block's columns are loss rows (logits_per_text)
    chunk_size: Optional[int] = None
    loss_dtype: Optional[torch.dtype] = None

    def kwargs(self) -> dict:
        return chunk_kwargs(self.backend, self.chunk_size)


class DistillBlockFunction(torch.autograd.Function):
    """Half the mean row term (``opts.rows``) plus half the mean column term (``opts.cols``)."""

    @staticmethod
    def forward(ctx, img, txt, scale, timg, ttxt, tscale, opts: DistillOptions):
        lse_impl = clip_backends.get_loaded(opts.backend)
        impl = distill_backends.get_loaded(opts.backend)
        kw = opts.kwargs()
        s, t = scale, tscale  # the backends' 0-d scalars (``clip_fast.core.checks``)
        img, txt, timg, ttxt = (x.contiguous() for x in (img, txt, timg, ttxt))
        # 1. The float64 log-sum-exps of both models (the CLIP forward sweep).
        lse_row, lse_col, _ = lse_impl.lse_forward(img, txt, s, None, **kw)
        tlse_row, tlse_col, _ = lse_impl.lse_forward(timg, ttxt, t, None, **kw)
        if not opts.rows:
            lse_row = tlse_row = None
        if not opts.cols:
            lse_col = tlse_col = None
        # 2. One sweep for the cross terms.
        row_term, col_term = impl.distill_forward(img, txt, s, timg, ttxt, t, lse_row, lse_col,
                                                  tlse_row, tlse_col, **kw)
        loss = torch.zeros((), dtype=torch.float64, device=img.device)
        if opts.rows:
            loss = loss + row_term.mean() / 2
        if opts.cols:
            loss = loss + col_term.mean() / 2
        ctx.save_for_backward(img, txt, scale, timg, ttxt, tscale, lse_row, lse_col, tlse_row, tlse_col,
                              row_term, col_term)
        ctx.opts = opts
        return fresh_output(loss, opts.loss_dtype or img.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss):
        (img, txt, scale, timg, ttxt, tscale, lse_row, lse_col, tlse_row, tlse_col,
         row_term, col_term) = ctx.saved_tensors
        opts: DistillOptions = ctx.opts
        needs = ctx.needs_input_grad
        teacher = any(needs[3:6])
        with torch.no_grad():
            impl = distill_backends.get_loaded(opts.backend)
            coef_row = 1.0 / (2 * img.shape[0]) if opts.rows else 0.0
            coef_col = 1.0 / (2 * txt.shape[0]) if opts.cols else 0.0
            d_img, d_txt, d_s, d_timg, d_ttxt, d_t = impl.distill_backward(
                img, txt, scale, timg, ttxt, tscale, lse_row,
                lse_col, tlse_row, tlse_col, row_term, col_term, coef_row, coef_col, teacher, **opts.kwargs())
            g = grad_loss.detach().to(d_img.dtype)

            def out(d, like, need):
                if not need or d is None:
                    return None
                return (d * g).to(like.dtype).reshape(like.shape)

            grads = (out(d_img, img, needs[0]), out(d_txt, txt, needs[1]), out(d_s, scale, needs[2]),
                     out(d_timg, timg, needs[3]), out(d_ttxt, ttxt, needs[4]), out(d_t, tscale, needs[5]),
                     None)
        return first_order_only("clip_fast's distillation loss", grads)


def block(img, txt, scale, timg, ttxt, tscale, opts: DistillOptions) -> torch.Tensor:
    return apply_function(DistillBlockFunction, opts.loss_dtype, img, txt, scale, timg, ttxt, tscale, opts)
