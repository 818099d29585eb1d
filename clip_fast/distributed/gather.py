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

The options of ``clip_fast.targets`` take open_clip's gather as it would apply to them:
``group_ids`` are gathered with the features (group sizes count the whole global batch);
hard negatives are gathered like the features (any M per rank, 0 included) and join
every rank's softmaxes: the negative texts are extra columns of every image row
(strip (img_r, NEG_TXT)), the negative images extra rows of every text column (each
rank's (neg_img_r, TXT) column partials merge before the logsumexp across ranks).
Label smoothing is uniform over K_r = N + M_t and K_c = N + M_i classes.  With
local_loss the rank's loss is lam / n_r * sum of its rows' CE + (1 - lam) / n_r * sum of
its columns' CE; without, every rank's loss is the global loss.  Negatives follow the
features' gradient rule: with gather_with_grad every rank's loss reaches their owner;
without it only the rank's own loss does, through its own shard as open_clip re-inserts
it when not local_loss -- with local_loss=True, gather_with_grad=False the negatives
appear only as gathered (constant) copies, so their gradient is zero, as open_clip's
gather would give.
The target terms beyond the softmaxes (Q of ``clip_fast.targets``) are O(N * D) host
sums per strip; the label pairs of a rank's rows sit at its row offset o_r in the strips,
so their logits are taken on the host (``s * <img_i, txt_i>``), not from a kernel diagonal.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..autograd import autocast_off, bias_meta, finish_grads, first_order_only, fresh_output
from ..backends import compute_dtype
from ..targets import dot64, group_counts
from .agreement import Layout
from .collectives import all_gather_rows, logsumexp_across_ranks, reduce_scatter_rows
from .common import FamilyTargets, backend_args, rowdot

_F64 = torch.float64


def _sub_targets(tg: FamilyTargets, d_x, d_y, x, y, a: float, b: float, offset: int, s, acc,
                 ids=(None, None), counts=(None, None)) -> torch.Tensor:
    """Subtract one strip's target part, s * Q @ y from d_x and s * Q.T @ x from d_y (either
    may be None: not wanted), and return t = sum_ij Q_ij <x_i, y_j> (float64).

    Q holds the label pairs (i, i + offset) (or the id groups) and the smoothing; without
    ids and smoothing only the label pairs, each with weight a + b, taken directly.
    """
    if tg.host:
        qx, qy, t, _ = tg.block(x, y, a, b, acc, positives=True, ids_x=ids[0], ids_y=ids[1],
                                counts_x=counts[0], counts_y=counts[1], pair_offset=offset)
        if d_x is not None:
            d_x.sub_(qx * s)
        if d_y is not None:
            d_y.sub_(qy * s)
        return t
    w = a + b
    lo, hi = max(0, -offset), min(x.shape[0], y.shape[0] - offset)
    xs, ys = x[lo:hi].to(acc), y[lo + offset:hi + offset].to(acc)
    # In place (addcmul_), no (n, D) temporary: the strips' (N, D) outputs are alive here.
    if d_x is not None:
        d_x[lo:hi].addcmul_(ys, s, value=-w)
    if d_y is not None:
        d_y[lo + offset:hi + offset].addcmul_(xs, s, value=-w)
    return w * dot64(xs, ys)


def _sub_uniform(tg: FamilyTargets, d_x, d_y, x, y, a: float, b: float, s, acc):
    """A hard-negative strip's target part (smoothing only), as ``_sub_targets``; 0 without smoothing."""
    terms = tg.uniform(x, y, a, b, acc)
    if terms is None:
        return 0.0
    qx, qy, t = terms
    if d_x is not None:
        d_x.sub_(qx * s)
    if d_y is not None:
        d_y.sub_(qy * s)
    return t


def _label_weights(tg: FamilyTargets, x, y, a: float, b: float, offset: int, acc, ids=(None, None),
                   counts=(None, None)):
    """(t, w) of one strip for the loss: t = sum Q_ij <x_i, y_j> over all but the label pairs
    (i, i + offset), w their target weights in pair order (float64)."""
    if not tg.host:
        return 0.0, a + b
    _, _, t, w = tg.block(x, y, a, b, acc, positives=True, ids_x=ids[0], ids_y=ids[1],
                          counts_x=counts[0], counts_y=counts[1], pair_offset=offset,
                          kernel_diag=True, diag_offset=offset)
    return t, w


def _neg_out(d: Optional[torch.Tensor], like: Optional[torch.Tensor], needed: bool):
    """A hard-negative input's gradient in its dtype (zeros when nothing reached it)."""
    if not needed or like is None:
        return None
    if d is None:
        return torch.zeros_like(like)
    return d.to(like.dtype)


class GatherClipLoss(torch.autograd.Function):
    """Inputs: (img, txt, scale, bias, group_ids, neg_txt, neg_img, layout)."""

    @staticmethod
    def forward(ctx, img, txt, scale, bias, ids, neg_txt, neg_img, layout: Layout):
        acc = compute_dtype(img.dtype)
        impl, kw, s = backend_args(layout, scale, acc)
        tg = FamilyTargets.of(layout)
        n, o = layout.n_local, layout.offsets[layout.rank]
        img, txt = img.contiguous(), txt.contiguous()
        # 1. Everyone's features (the no-grad copies of open_clip's gather), ids and negatives.
        all_img, all_txt = all_gather_rows(img, layout), all_gather_rows(txt, layout)
        all_ids = counts_all = counts = None
        if ids is not None:
            all_ids = all_gather_rows(ids, layout)
            counts_all = group_counts(all_ids)  # group sizes over the global batch
            counts = counts_all[o:o + n]
        # A softmax of weight 0 (lam = 0 or 1) does not need its negatives.
        use_nt = layout.m_txt > 0 and tg.lam > 0.0
        use_ni = layout.m_img > 0 and tg.lam < 1.0
        all_nt = all_gather_rows(neg_txt, layout, layout.neg_txt_sizes) if use_nt else None
        all_ni = all_gather_rows(neg_img, layout, layout.neg_img_sizes) if use_ni else None
        # 2. Row strip: complete lse for this rank's rows (negative texts included),
        #    column partials over them and over this rank's negative images.
        lse_row, col_partial, _ = impl.lse_forward(img, all_txt, s, None, **kw)
        if use_nt:
            lse_row = torch.logaddexp(lse_row, impl.lse_forward(img, all_nt, s, None, **kw)[0])
        if use_ni and neg_img.shape[0]:
            col_partial = torch.logaddexp(col_partial, impl.lse_forward(neg_img, all_txt, s, None, **kw)[1])
        # 3. Complete column lse: logsumexp of every rank's partials.
        lse_col = logsumexp_across_ranks(col_partial, layout)
        dot = rowdot(img, txt, acc)  # <img_i, txt_i>: the label logits are s * dot + b
        s64 = s.to(_F64)
        if layout.local_loss:
            a, b = tg.weights(n)
            diag = s * dot
            loss = a * (lse_row - diag).sum() + b * (lse_col[o:o + n] - diag).sum()
            if tg.host:
                # Rows: strip (img_r, TXT), label pairs at o; columns: (IMG, txt_r), pairs at -o.
                t_r, w_r = _label_weights(tg, img, all_txt, a, 0.0, o, acc, (ids, all_ids), (counts, counts_all))
                t_c, w_c = _label_weights(tg, all_img, txt, 0.0, b, -o, acc, (all_ids, ids), (counts_all, counts))
                t = t_r + t_c
                if use_nt and tg.eps:
                    t = t + tg.uniform(img, all_nt, a, 0.0, acc)[2]
                if use_ni and tg.eps:
                    t = t + tg.uniform(all_ni, txt, 0.0, b, acc)[2]
                d64 = diag.to(_F64)
                loss = loss + ((a - w_r) * d64).sum() + ((b - w_c) * d64).sum() - s64 * t
            lse_row_all = None
        else:  # every rank forms the same global loss from the same gathered values
            a, b = tg.weights(layout.n_global)
            lse_row_all = all_gather_rows(lse_row, layout)
            diag_all = s * rowdot(all_img, all_txt, acc)
            loss = a * (lse_row_all - diag_all).sum() + b * (lse_col - diag_all).sum()
            if tg.host:
                t, w = _label_weights(tg, all_img, all_txt, a, b, 0, acc, (all_ids, all_ids),
                                      (counts_all, counts_all))
                if use_nt and tg.eps:
                    t = t + tg.uniform(all_img, all_nt, a, 0.0, acc)[2]
                if use_ni and tg.eps:
                    t = t + tg.uniform(all_ni, all_txt, 0.0, b, acc)[2]
                loss = loss + ((a + b - w) * diag_all.to(_F64)).sum() - s64 * t
        ctx.save_for_backward(img, txt, scale, all_img, all_txt, lse_row, lse_col, lse_row_all,
                              ids, all_ids, counts_all, neg_txt, neg_img, all_nt, all_ni)
        ctx.layout = layout
        ctx.bias_meta = bias_meta(bias)
        return fresh_output(loss, layout.opts.loss_dtype or img.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss):
        (img, txt, scale, all_img, all_txt, lse_row, lse_col, lse_row_all, ids, all_ids, counts_all,
         neg_txt, neg_img, all_nt, all_ni) = ctx.saved_tensors
        layout: Layout = ctx.layout
        acc = compute_dtype(img.dtype)
        impl, kw, s = backend_args(layout, scale, acc)
        tg = FamilyTargets.of(layout)
        g = grad_loss.detach().reshape(()).to(acc)
        n, o = layout.n_local, layout.offsets[layout.rank]
        counts = None if counts_all is None else counts_all[o:o + n]
        lse_col_r = lse_col[o:o + n].contiguous()
        gwg = layout.gather_with_grad
        d_nt = d_ni = None
        if layout.local_loss:
            # loss_r = a * sum of rank r's rows' CE + b * sum of its columns' CE.  The strips'
            # (N, D) outputs are the gradient of this rank's loss w.r.t. the other ranks'
            # gathered features (and negatives); with gather_with_grad they are summed on
            # their owners (the backward of open_clip's all_gather), else dropped.  One
            # lives at a time.  The label pairs' target terms follow the same routes, so a
            # gathered copy without grad keeps only the label logit of its own strip.
            a, b = tg.weights(n)
            d_img, d_all, ds = impl.grad_backward(img, all_txt, s, None, lse_row, None, a, 0.0, 0.0, **kw)
            ds = ds.to(_F64) - _sub_targets(tg, d_img, d_all, img, all_txt, a, 0.0, o, s, acc,
                                            (ids, all_ids), (counts, counts_all))
            from_others_txt = reduce_scatter_rows(d_all.mul_(g), layout) if gwg else None
            del d_all
            if all_nt is not None:
                di, d_all, ds_n = impl.grad_backward(img, all_nt, s, None, lse_row, None, a, 0.0, 0.0, **kw)
                ds = ds + ds_n.to(_F64) - _sub_uniform(tg, di, d_all, img, all_nt, a, 0.0, s, acc)
                d_img.add_(di)
                d_nt = reduce_scatter_rows(d_all.mul_(g), layout, layout.neg_txt_sizes) if gwg else None
                del d_all
            d_all, d_txt, ds_c = impl.grad_backward(all_img, txt, s, None, None, lse_col_r, 0.0, b, 0.0, **kw)
            ds = ds + ds_c.to(_F64) - _sub_targets(tg, d_all, d_txt, all_img, txt, 0.0, b, -o, s, acc,
                                                   (all_ids, ids), (counts_all, counts))
            from_others_img = reduce_scatter_rows(d_all.mul_(g), layout) if gwg else None
            del d_all
            if all_ni is not None:
                d_all, dt, ds_n = impl.grad_backward(all_ni, txt, s, None, None, lse_col_r, 0.0, b, 0.0, **kw)
                ds = ds + ds_n.to(_F64) - _sub_uniform(tg, d_all, dt, all_ni, txt, 0.0, b, s, acc)
                d_txt.add_(dt)
                d_ni = reduce_scatter_rows(d_all.mul_(g), layout, layout.neg_img_sizes) if gwg else None
                del d_all
            d_scale = ds * g
            d_img, d_txt = d_img.mul_(g), d_txt.mul_(g)
            if gwg:
                d_img, d_txt = d_img.add_(from_others_img), d_txt.add_(from_others_txt)
        else:
            # The global loss L: this rank's row strips give d img_r, its column strips d txt_r,
            # (IMG, neg_txt_r) and (neg_img_r, TXT) its negatives' gradients.  Each strip's
            # other output belongs to other ranks' rows: dropped at once.
            a, b = tg.weights(layout.n_global)
            d_img, unused, ds = impl.grad_backward(img, all_txt, s, None, lse_row, lse_col, a, b, 0.0, **kw)
            del unused
            ds = ds.to(_F64) - _sub_targets(tg, d_img, None, img, all_txt, a, b, o, s, acc,
                                            (ids, all_ids), (counts, counts_all))
            unused, d_txt, _ = impl.grad_backward(all_img, txt, s, None, lse_row_all, lse_col_r,
                                                  a, b, 0.0, **kw)
            del unused
            _sub_targets(tg, None, d_txt, all_img, txt, a, b, -o, s, acc, (all_ids, ids), (counts_all, counts))
            if all_nt is not None:
                di, unused, ds_n = impl.grad_backward(img, all_nt, s, None, lse_row, None, a, 0.0, 0.0, **kw)
                del unused
                d_img.add_(di)
                ds = ds + ds_n.to(_F64) - _sub_uniform(tg, d_img, None, img, all_nt, a, 0.0, s, acc)
                if neg_txt.shape[0]:
                    unused, d_nt, _ = impl.grad_backward(all_img, neg_txt, s, None, lse_row_all, None,
                                                         a, 0.0, 0.0, **kw)
                    del unused
                    _sub_uniform(tg, None, d_nt, all_img, neg_txt, a, 0.0, s, acc)
            if all_ni is not None:
                unused, dt, _ = impl.grad_backward(all_ni, txt, s, None, None, lse_col_r, 0.0, b, 0.0, **kw)
                del unused
                d_txt.add_(dt)
                _sub_uniform(tg, None, d_txt, all_ni, txt, 0.0, b, s, acc)
                if neg_img.shape[0]:
                    d_ni, unused, ds_n = impl.grad_backward(neg_img, all_txt, s, None, None, lse_col,
                                                            0.0, b, 0.0, **kw)
                    del unused
                    ds = ds + ds_n.to(_F64) - _sub_uniform(tg, d_ni, None, neg_img, all_txt, 0.0, b, s, acc)
            # The row strips and (neg_img_r, TXT) partition the logits: summing them gives
            # dL/dscale; the same all_reduce sums the upstream gradients (gather_with_grad
            # sends every rank's dL_q/dfeatures to the owner).
            pair = torch.stack([ds, g.to(_F64)])
            dist.all_reduce(pair, group=layout.group)
            d_scale = pair[0] * g
            feat = (pair[1] if gwg else g).to(acc)
            d_img, d_txt = d_img.mul_(feat), d_txt.mul_(feat)
            d_nt = None if d_nt is None else d_nt.mul_(feat)
            d_ni = None if d_ni is None else d_ni.mul_(feat)
        needs = ctx.needs_input_grad
        out = finish_grads(d_img, d_txt, d_scale.to(acc), None, img, txt, scale, ctx.bias_meta, needs)
        grads = out[:4] + (None, _neg_out(d_nt, neg_txt, needs[5]), _neg_out(d_ni, neg_img, needs[6]), None)
        return first_order_only("clip_fast's distributed CLIP loss", grads)
