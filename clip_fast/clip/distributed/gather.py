"""Gather mode: open_clip's ``ClipLoss`` semantics for all four flag combinations.

The loss value and every rank's gradients are those of ``ClipLoss`` run on the same
shards (``d_logit_scale`` included: the gradient of the loss *that rank* computed).

    forward   all_gather IMG, TXT (N x D)                      open_clip does the same
              row strip (img_r, TXT): lse_row of rank r's rows, column partials (N,)
              lse_col = logsumexp over ranks of the partials   2 all_reduce of N floats
              not local_loss: each rank forms its rows', columns' and strip's share of the
              global loss, one all_reduce sums them; all_gather lse_row (N floats) for the backward
    backward  row strip (img_r, TXT) -> d img_r      column strip (IMG, txt_r) -> d txt_r
              local_loss, gather_with_grad: the strips' other outputs (the gradient that
              rank r's loss sends to the other ranks' features) are reduce-scattered,
              exactly like the backward of open_clip's ``torch.distributed.nn.all_gather``.
              not local_loss: one all_reduce of 2 floats (d_scale of the global loss).

The options of ``clip_fast.clip.targets`` take open_clip's gather as it would apply to them:
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
The target terms beyond the softmaxes (Q of ``clip_fast.clip.targets``) are O(N * D) host
sums per strip.
With ``matryoshka_dims`` every strip goes through the nested sweep (``sweeps.NestedSweeps``):
the statistics gain a leading size axis (the logsumexp across ranks and the rotations act
per size), the loss is the weighted sum over the sizes, the host target terms are formed on
each size's prefix features, and each strip's gradient is already that of the raw features
(the prefix normalisation inside), so the reduce-scatter and all_reduce steps are unchanged.

Exactness: every gathered tensor is built rotated, this rank's rows first
(``clip_fast.core.collectives.rank_order``), so in the strips (img_r, TXT) and (IMG, txt_r)
the rank's own pairs sit on the diagonal.  The backends then keep the label logits out of the
log-sum-exp sums and return them in float64 (``diag``); the loss is formed from the
per-pair terms ``lse - diag`` and G's diagonal from ``diag_grad``, exactly as in the
single-process loss, so a confident row at scale 100 loses nothing to the rounding of
|S|.  The (N,) column statistics are rotated back to rank order before they are merged
across ranks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ...core.autograd import (autocast_off, bias_guard, bias_meta, finish_grads, first_order_only,
                              fresh_output)
from ...core.collectives import all_gather_rows, logsumexp_across_ranks, reduce_scatter_rows, rotate, unrotate
from ...core.numerics import compute_dtype
from ..targets import group_counts
from .agreement import Layout
from .common import FamilyTargets, sweep_setup

_F64 = torch.float64


def _strip_targets(tg: FamilyTargets, a: float, b: float, acc, ids=(None, None), counts=(None, None)):
    """One rotated strip's host target terms as a function of its features (``ops.host_sum``,
    ``ops.sub_host``): its label pairs are its diagonal, carried by the kernels' ``coef_diag``,
    so Q here holds the id groups and the smoothing beyond them."""
    return lambda x, y: tg.block(x, y, a, b, acc, positives=True, ids_x=ids[0], ids_y=ids[1],
                                 counts_x=counts[0], counts_y=counts[1], kernel_diag=True)


def _sub_targets(tg: FamilyTargets, ops, d_x, d_y, x, y, a: float, b: float, acc, ids=(None, None),
                 counts=(None, None)):
    """Subtract one strip's host target part, s * Q @ y from d_x and s * Q.T @ x from d_y
    (either may be None: not wanted), and return t = sum_ij Q_ij <x_i, y_j> (float64); 0
    without groups or smoothing."""
    if not tg.host:
        return 0.0
    return ops.sub_host(d_x, d_y, x, y, _strip_targets(tg, a, b, acc, ids, counts))


def _sub_uniform(tg: FamilyTargets, ops, d_x, d_y, x, y, a: float, b: float, acc):
    """A hard-negative strip's target part (smoothing only), as ``_sub_targets``; 0 without smoothing."""
    if not tg.eps:
        return 0.0
    return ops.sub_host(d_x, d_y, x, y, lambda px, py: tg.uniform(px, py, a, b, acc))


def _uniform_sum(tg: FamilyTargets, ops, x, y, a: float, b: float, acc):
    """A hard-negative strip's t (smoothing only)."""
    return ops.host_sum(x, y, lambda px, py: tg.uniform(px, py, a, b, acc))[0]


def _diag_weights(tg: FamilyTargets, ops, x, y, a: float, b: float, acc, ids=(None, None),
                  counts=(None, None)):
    """(t, w) of one rotated strip: t = sum Q_ij <x_i, y_j> over all but its diagonal pairs,
    w their target weights (the kernels' ``coef_diag``: a + b without groups or smoothing)."""
    if not tg.host:
        return 0.0, a + b
    t, (w,) = ops.host_sum(x, y, _strip_targets(tg, a, b, acc, ids, counts))
    return t, w


def _neg_out(d: Optional[torch.Tensor], like: Optional[torch.Tensor], needed: bool):
    """A hard-negative input's gradient in its dtype (zeros when nothing reached it)."""
    if not needed or like is None:
        return None
    if d is None:
        return torch.zeros_like(like)
    return d.to(like.dtype)


class _Gathered:
    """One call's gathered tensors, rotated (this rank's rows first), and its local row count."""

    def __init__(self, layout: Layout, tg: FamilyTargets, img, txt, ids, neg_txt, neg_img):
        self.n = layout.n_local
        self.img = all_gather_rows(img, layout, rotate=True)
        self.txt = all_gather_rows(txt, layout, rotate=True)
        self.ids = self.counts = None
        if ids is not None:
            self.ids = all_gather_rows(ids, layout, rotate=True)
            self.counts = group_counts(self.ids)  # group sizes over the global batch
        # A softmax of weight 0 (lam = 0 or 1) does not need its negatives.
        use_nt = layout.m_txt > 0 and tg.lam > 0.0
        use_ni = layout.m_img > 0 and tg.lam < 1.0
        self.nt = all_gather_rows(neg_txt, layout, layout.neg_txt_sizes) if use_nt else None
        self.ni = all_gather_rows(neg_img, layout, layout.neg_img_sizes) if use_ni else None

    def own_counts(self):
        return None if self.counts is None else self.counts[:self.n]


def _gather_stats(v: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Every rank's per-row statistics (the last axis), rotated; a leading size axis kept."""
    return all_gather_rows(v.movedim(-1, 0), layout, rotate=True).movedim(0, -1).contiguous()


def _local_forward(tg: FamilyTargets, ops, layout: Layout, g: _Gathered, img, txt, ids,
                   lse_row, lse_col_r, diag, s, acc):
    """Rank r's own loss (local_loss): lam / n_r * its rows' CE + (1 - lam) / n_r * its
    columns' CE.  Returns (loss, w_row, w_col): the diagonals' target weights."""
    a, b = tg.weights(layout.n_local)
    loss = a * ops.total(lse_row - diag) + b * ops.total(lse_col_r - diag)
    counts = g.own_counts()
    # Rows: strip (img_r, TXT); columns: strip (IMG, txt_r); both with the pairs on the diagonal.
    t_r, w_r = _diag_weights(tg, ops, img, g.txt, a, 0.0, acc, (ids, g.ids), (counts, g.counts))
    t_c, w_c = _diag_weights(tg, ops, g.img, txt, 0.0, b, acc, (g.ids, ids), (g.counts, counts))
    if tg.host:
        t = t_r + t_c
        if g.nt is not None and tg.eps:
            t = t + _uniform_sum(tg, ops, img, g.nt, a, 0.0, acc)
        if g.ni is not None and tg.eps:
            t = t + _uniform_sum(tg, ops, g.ni, txt, 0.0, b, acc)
        loss = loss + ops.total((a - w_r) * diag) + ops.total((b - w_c) * diag) - s.to(_F64) * t
    return loss, w_r, w_c


def _global_forward(tg: FamilyTargets, ops, layout: Layout, g: _Gathered, img, ids, neg_img,
                    lse_row, lse_col_r, diag, s, acc):
    """The global loss (not local_loss), the same on every rank: each rank forms its rows',
    its columns' and its row strip's target share, and one all_reduce sums them.
    Returns (loss, w): the diagonal's target weights, for both of its strips."""
    a, b = tg.weights(layout.n_global)
    part = a * ops.total(lse_row - diag) + b * ops.total(lse_col_r - diag)
    counts = g.own_counts()
    t, w = _diag_weights(tg, ops, img, g.txt, a, b, acc, (ids, g.ids), (counts, g.counts))
    if tg.host:
        # The row strips (img_q, TXT) and the negative strips (img_q, NEG_TXT),
        # (neg_img_q, TXT) partition every target block.
        if g.nt is not None and tg.eps:
            t = t + _uniform_sum(tg, ops, img, g.nt, a, 0.0, acc)
        if g.ni is not None and tg.eps and neg_img.shape[0]:
            t = t + _uniform_sum(tg, ops, neg_img, g.txt, 0.0, b, acc)
        part = part + ops.total((a + b - w) * diag) - s.to(_F64) * t
    dist.all_reduce(part, group=layout.group)
    return part, w


class GatherClipLoss(torch.autograd.Function):
    """Inputs: (img, txt, scale, bias, group_ids, neg_txt, neg_img, layout)."""

    @staticmethod
    def forward(ctx, img, txt, scale, bias, ids, neg_txt, neg_img, layout: Layout):
        ops, s, acc, tg = sweep_setup(layout, scale, img)
        n, o = layout.n_local, layout.offsets[layout.rank]
        img, txt = img.contiguous(), txt.contiguous()
        # 1. Everyone's features (the no-grad copies of open_clip's gather), ids and
        #    negatives, this rank's first: its pairs are the strips' diagonal.
        g = _Gathered(layout, tg, img, txt, ids, neg_txt, neg_img)
        # 2. Row strip: complete lse for this rank's rows (negative texts included), the
        #    label logits (diag, float64) and column partials over them and over this
        #    rank's negative images (rotated, as the strip's columns).
        lse_row, col_partial, diag = ops.lse(img, g.txt)
        if g.nt is not None:
            lse_row = torch.logaddexp(lse_row, ops.lse(img, g.nt)[0])
        if g.ni is not None and neg_img.shape[0]:
            col_partial = torch.logaddexp(col_partial, ops.lse(neg_img, g.txt)[1])
        # 3. Complete column lse: logsumexp of every rank's partials, in rank order.
        lse_col = logsumexp_across_ranks(unrotate(col_partial, layout), layout)
        lse_col_r = lse_col[..., o:o + n]
        if layout.local_loss:
            loss, w_row, w_col = _local_forward(tg, ops, layout, g, img, txt, ids, lse_row, lse_col_r,
                                                diag, s, acc)
            lse_row_all = None
        else:
            loss, w_row = _global_forward(tg, ops, layout, g, img, ids, neg_img, lse_row, lse_col_r,
                                          diag, s, acc)
            w_col = w_row
            lse_row_all = _gather_stats(lse_row, layout)
        loss = loss + bias_guard(bias)
        ctx.save_for_backward(img, txt, scale, g.img, g.txt, lse_row, lse_col, lse_row_all, diag,
                              ids, g.ids, g.counts, neg_txt, neg_img, g.nt, g.ni,
                              *(w if isinstance(w, torch.Tensor) else None for w in (w_row, w_col)))
        ctx.layout = layout
        ctx.bias_meta = bias_meta(bias)
        return fresh_output(loss, layout.opts.loss_dtype or img.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss):
        saved = ctx.saved_tensors
        layout: Layout = ctx.layout
        img, txt, scale = saved[:3]
        acc = compute_dtype(img.dtype)
        g = grad_loss.detach().reshape(()).to(acc)
        step = _Backward(layout, saved, acc)
        if layout.local_loss:
            d_img, d_txt, d_scale, d_nt, d_ni = step.local(g)
        else:
            d_img, d_txt, d_scale, d_nt, d_ni = step.global_(g)
        needs = ctx.needs_input_grad
        out = finish_grads(d_img, d_txt, d_scale.to(acc), None, img, txt, scale, ctx.bias_meta, needs)
        neg_txt, neg_img = saved[12], saved[13]
        grads = out[:4] + (None, _neg_out(d_nt, neg_txt, needs[5]), _neg_out(d_ni, neg_img, needs[6]), None)
        return first_order_only("clip_fast's distributed CLIP loss", grads)


class _Backward:
    """The gather mode's backward strips, over the forward's saved (rotated) tensors."""

    def __init__(self, layout: Layout, saved, acc):
        (self.img, self.txt, scale, self.all_img, self.all_txt, self.lse_row, lse_col,
         self.lse_row_all, self.diag, self.ids, self.all_ids, self.counts_all, self.neg_txt,
         self.neg_img, self.all_nt, self.all_ni, w_row, w_col) = saved
        self.layout, self.acc = layout, acc
        self.ops, self.s, _, self.tg = sweep_setup(layout, scale, self.img)
        n, o = layout.n_local, layout.offsets[layout.rank]
        self.counts = None if self.counts_all is None else self.counts_all[:n]
        self.lse_col = lse_col
        self.lse_col_r = lse_col[..., o:o + n].contiguous()
        self.w_row, self.w_col = w_row, w_col

    def _strip(self, x, y, lse_row, lse_col, a, b, w, ids, counts, keep_x=True, keep_y=True):
        """One rotated strip's (d_x, d_y, d_scale): the kernels' sweep with the label pairs
        on the diagonal (weights ``w``), minus the host target terms."""
        w = (a + b) if w is None else w
        d_x, d_y, ds = self.ops.grad(x, y, lse_row, lse_col, a, b, w, diag=self.diag)
        d_x, d_y = (d_x if keep_x else None), (d_y if keep_y else None)  # an unkept (N, D) goes now
        ds = ds.to(_F64) - _sub_targets(self.tg, self.ops, d_x, d_y, x, y, a, b, self.acc, ids, counts)
        return d_x, d_y, ds

    def _neg(self, x, y, lse_row, lse_col, a, b, keep_x=True, keep_y=True):
        """A hard-negative strip (no label pairs): (d_x, d_y, d_scale), as ``_strip``."""
        d_x, d_y, ds = self.ops.grad(x, y, lse_row, lse_col, a, b, 0.0)
        d_x, d_y = (d_x if keep_x else None), (d_y if keep_y else None)
        ds = ds.to(_F64) - _sub_uniform(self.tg, self.ops, d_x, d_y, x, y, a, b, self.acc)
        return d_x, d_y, ds

    def local(self, g):
        """loss_r = a * sum of rank r's rows' CE + b * sum of its columns' CE.  The strips'
        (N, D) outputs are the gradient of this rank's loss w.r.t. the other ranks' gathered
        features (and negatives); with gather_with_grad they are summed on their owners
        (the backward of open_clip's all_gather), else dropped.  One lives at a time."""
        layout, tg = self.layout, self.tg
        gwg = layout.gather_with_grad
        a, b = tg.weights(layout.n_local)
        d_nt = d_ni = None
        d_img, d_all, ds = self._strip(self.img, self.all_txt, self.lse_row, None, a, 0.0, self.w_row,
                                       (self.ids, self.all_ids), (self.counts, self.counts_all))
        from_others_txt = reduce_scatter_rows(d_all.mul_(g), layout, rotated=True) if gwg else None
        del d_all
        if self.all_nt is not None:
            di, d_all, ds_n = self._neg(self.img, self.all_nt, self.lse_row, None, a, 0.0)
            ds = ds + ds_n
            d_img.add_(di)
            d_nt = reduce_scatter_rows(d_all.mul_(g), layout, layout.neg_txt_sizes) if gwg else None
            del d_all
        d_all, d_txt, ds_c = self._strip(self.all_img, self.txt, None, self.lse_col_r, 0.0, b, self.w_col,
                                         (self.all_ids, self.ids), (self.counts_all, self.counts))
        ds = ds + ds_c
        from_others_img = reduce_scatter_rows(d_all.mul_(g), layout, rotated=True) if gwg else None
        del d_all
        if self.all_ni is not None:
            d_all, dt, ds_n = self._neg(self.all_ni, self.txt, None, self.lse_col_r, 0.0, b)
            ds = ds + ds_n
            d_txt.add_(dt)
            d_ni = reduce_scatter_rows(d_all.mul_(g), layout, layout.neg_img_sizes) if gwg else None
            del d_all
        d_img, d_txt = d_img.mul_(g), d_txt.mul_(g)
        if gwg:
            d_img, d_txt = d_img.add_(from_others_img), d_txt.add_(from_others_txt)
        return d_img, d_txt, ds * g, d_nt, d_ni

    def global_(self, g):
        """The global loss L: this rank's row strips give d img_r, its column strips d txt_r,
        (IMG, neg_txt_r) and (neg_img_r, TXT) its negatives' gradients.  Each strip's other
        output belongs to other ranks' rows: dropped at once."""
        layout, tg = self.layout, self.tg
        a, b = tg.weights(layout.n_global)
        lse_col_rot = rotate(self.lse_col, layout)
        d_nt = d_ni = None
        d_img, _, ds = self._strip(self.img, self.all_txt, self.lse_row, lse_col_rot, a, b, self.w_row,
                                   (self.ids, self.all_ids), (self.counts, self.counts_all), keep_y=False)
        _, d_txt, _ = self._strip(self.all_img, self.txt, self.lse_row_all, self.lse_col_r, a, b,
                                  self.w_col, (self.all_ids, self.ids), (self.counts_all, self.counts),
                                  keep_x=False)
        if self.all_nt is not None:
            di, _, ds_n = self._neg(self.img, self.all_nt, self.lse_row, None, a, 0.0, keep_y=False)
            d_img.add_(di)
            ds = ds + ds_n
            if self.neg_txt.shape[0]:
                _, d_nt, _ = self._neg(self.all_img, self.neg_txt, self.lse_row_all, None, a, 0.0,
                                       keep_x=False)
        if self.all_ni is not None:
            _, dt, _ = self._neg(self.all_ni, self.txt, None, self.lse_col_r, 0.0, b, keep_x=False)
            d_txt.add_(dt)
            if self.neg_img.shape[0]:
                d_ni, _, ds_n = self._neg(self.neg_img, self.all_txt, None, lse_col_rot, 0.0, b,
                                          keep_y=False)
                ds = ds + ds_n
        # The row strips and (neg_img_r, TXT) partition the logits: summing them gives
        # dL/dscale; the same all_reduce sums the upstream gradients (gather_with_grad
        # sends every rank's dL_q/dfeatures to the owner).
        pair = torch.stack([ds, g.to(_F64)])
        dist.all_reduce(pair, group=layout.group)
        feat = (pair[1] if layout.gather_with_grad else g).to(self.acc)
        d_img, d_txt = d_img.mul_(feat), d_txt.mul_(feat)
        d_nt = None if d_nt is None else d_nt.mul_(feat)
        d_ni = None if d_ni is None else d_ni.mul_(feat)
        return d_img, d_txt, pair[0] * g, d_nt, d_ni
