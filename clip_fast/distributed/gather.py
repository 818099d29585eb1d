"""Gather mode: open_clip's ``ClipLoss`` semantics for all four flag combinations.

The loss value and every rank's gradients are those of ``ClipLoss`` run on the same
shards (``d_logit_scale`` included: the gradient of the loss *that rank* computed).

    forward   all_gather IMG, TXT (N x D)                      open_clip does the same
              row strip (img_r, TXT): lse_row of rank r's rows, column partials (N,)
              lse_col = logsumexp over ranks of the partials   2 all_reduce of N floats
              not local_loss: all_gather lse_row (N floats); every rank forms the global loss
    backward  row strip (img_r, TXT) -> d img_r      column strip (IMG, txt_r) -> d txt_r
              local_loss, gather_with_grad: the strips' other outputs (the gradient that
              rank r's loss sends to the other ranks' features) are reduce-scattered,
              exactly like the backward of open_clip's ``torch.distributed.nn.all_gather``.
              not local_loss: one all_reduce of 2 floats (d_scale of the global loss).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .._autograd import autocast_off, first_order_only, fresh_output
from ..autograd import bias_meta, finish_grads
from ..backends import compute_dtype
from .agreement import Layout
from .collectives import all_gather_rows, logsumexp_across_ranks, reduce_scatter_rows
from .common import backend_args, rowdot


class GatherClipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, scale, bias, layout: Layout):
        acc = compute_dtype(img.dtype)
        impl, kw, s = backend_args(layout, scale, acc)
        n, o = layout.n_local, layout.offsets[layout.rank]
        img, txt = img.contiguous(), txt.contiguous()
        # 1. Everyone's features (the no-grad copies of open_clip's gather).
        all_img, all_txt = all_gather_rows(img, layout), all_gather_rows(txt, layout)
        # 2. Row strip: complete lse for this rank's rows, column partials over them.
        lse_row, col_partial, _ = impl.lse_forward(img, all_txt, s, None, **kw)
        # 3. Complete column lse: logsumexp of every rank's partials.
        lse_col = logsumexp_across_ranks(col_partial, layout)
        dot = rowdot(img, txt, acc)  # <img_i, txt_i>: the label logits are s * dot + b
        if layout.local_loss:
            diag = s * dot
            loss = ((lse_row - diag).mean() + (lse_col[o:o + n] - diag).mean()) / 2
            lse_row_all = None
        else:  # every rank forms the same global loss from the same gathered values
            lse_row_all = all_gather_rows(lse_row, layout)
            diag_all = s * rowdot(all_img, all_txt, acc)
            loss = ((lse_row_all - diag_all).mean() + (lse_col - diag_all).mean()) / 2
        ctx.save_for_backward(img, txt, scale, all_img, all_txt, lse_row, lse_col, lse_row_all, dot)
        ctx.layout = layout
        ctx.bias_meta = bias_meta(bias)
        return fresh_output(loss, layout.opts.loss_dtype or img.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss):
        img, txt, scale, all_img, all_txt, lse_row, lse_col, lse_row_all, dot = ctx.saved_tensors
        layout: Layout = ctx.layout
        acc = compute_dtype(img.dtype)
        impl, kw, s = backend_args(layout, scale, acc)
        g = grad_loss.detach().reshape(()).to(acc)
        n, o = layout.n_local, layout.offsets[layout.rank]
        if layout.local_loss:
            # loss_r = (mean_i CE(S[o+i, :]) + mean_j CE(S[:, o+j])) / 2 over this rank's rows/columns.
            # The strips' (N, D) outputs are the gradient of this rank's loss w.r.t. the other
            # ranks' gathered features; with gather_with_grad they are summed on their owners
            # (the backward of open_clip's all_gather), else dropped.  One lives at a time.
            c = 1.0 / (2 * n)
            d_img, d_all, ds_row = impl.grad_backward(img, all_txt, s, None, lse_row, None, c, 0.0, 0.0, **kw)
            from_others_txt = reduce_scatter_rows(d_all.mul_(g), layout) if layout.gather_with_grad else None
            del d_all
            d_all, d_txt, ds_col = impl.grad_backward(all_img, txt, s, None, None, lse_col[o:o + n].contiguous(),
                                                      0.0, c, 0.0, **kw)
            from_others_img = reduce_scatter_rows(d_all.mul_(g), layout) if layout.gather_with_grad else None
            del d_all
            d_scale = (ds_row + ds_col - 2 * c * dot.sum()) * g
            d_img, d_txt = d_img.mul_(g), d_txt.mul_(g)
            if layout.gather_with_grad:
                d_img, d_txt = d_img.add_(from_others_img), d_txt.add_(from_others_txt)
                label = 2 * c  # both label logits reach both own features
            else:
                label = c  # the gathered copies are constants: one label logit each
            d_img.sub_(txt.to(acc) * (label * g * s))
            d_txt.sub_(img.to(acc) * (label * g * s))
        else:
            # The global loss L with G = (P_row + P_col - 2I) / (2N): this rank's row and column strips.
            # Each strip's other (N, D) output belongs to other ranks' rows: dropped at once.
            c = 1.0 / (2 * sum(layout.sizes))
            d_img, unused, ds_part = impl.grad_backward(img, all_txt, s, None, lse_row, lse_col, c, c, 0.0, **kw)
            del unused
            unused, d_txt, _ = impl.grad_backward(all_img, txt, s, None, lse_row_all, lse_col[o:o + n].contiguous(),
                                                  c, c, 0.0, **kw)
            del unused
            d_img.sub_(txt.to(acc) * (2 * c * s))
            d_txt.sub_(img.to(acc) * (2 * c * s))
            # Row strips partition the logits: summing them gives dL/dscale; the same
            # all_reduce sums the upstream gradients (gather_with_grad sends every rank's
            # dL_q/dfeatures to the owner).
            pair = torch.stack([ds_part - 2 * c * dot.sum(), g])
            dist.all_reduce(pair, group=layout.group)
            d_scale = pair[0] * g
            feat = pair[1] if layout.gather_with_grad else g
            d_img, d_txt = d_img.mul_(feat), d_txt.mul_(feat)
        return first_order_only("clip_fast's distributed CLIP loss",
                                finish_grads(d_img, d_txt, d_scale, None, img, txt, scale,
                                             ctx.bias_meta, ctx.needs_input_grad))
