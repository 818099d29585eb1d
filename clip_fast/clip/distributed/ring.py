"""Ring mode: the ``local_loss=True, gather_with_grad=True`` semantics without ever holding
another rank's whole embeddings; text blocks travel around the ring.

At step k rank r holds ``txt_q`` (q = r - k mod w) and sweeps the block (img_r, txt_q) once:

    forward   the block's row lse partials merge into img_r's running lse_row (kept);
              its column partials merge (logaddexp) into an accumulator that travels
              with txt_q and arrives home complete after w hops.
    backward  the block's G = a_r P_row + b_q P_col (- the label targets on the own block)
              gives d img_r (kept) and d txt_q, which adds into an accumulator that
              travels with txt_q and arrives home complete.  Each tile is swept once per
              pass for both directions; a_q = g_q lam / n_q and b_q = g_q (1 - lam) / n_q
              with g_q rank q's upstream gradient.
    per step  forward: txt block (n D elements, input dtype) + n floats;
              backward: txt block + n floats + the n x D float32 gradient accumulator.
    overlap   the next text block is posted (isend/irecv) before the current block's
              sweep; the small accumulators are posted after it and only waited for
              when the next block merges them, one sweep later.
    memory    O(n_max * D) per rank: two text buffers and two accumulators, whatever w is.

``d_logit_scale`` is each rank's own d loss_r / d scale, as open_clip gives it: a block
(r, q) mixes rank r's loss (its rows) and rank q's loss (its columns), so its sweep
returns d_scale split into the row term and the rest (``grad_backward(split_scale=True)``;
the CUDA backend pays a second sweep for it).  Rank r keeps the row parts of its blocks;
each column part travels home to q as one extra float of the d txt_q accumulator.  The
own block (r, r) is wholly rank r's: one unsplit sweep, with its label terms on G's
diagonal from the forward's float64 loss terms (``diag``), so a confident row stays exact.

Options (``clip_fast.clip.targets``), with global softmaxes as in gather mode:
    group_ids      travel with the text block; the forward counts each local id's global
                   group size as they pass, and sums the positive pairs' dot products per
                   row (kept) and per column (travelling with the column lse), so a rank's
                   loss needs nothing N-sized; the backward's block targets get the group
                   sizes of the travelling texts with their column lse.
    label_smoothing  the forward's uniform part needs the global feature sums: one
                   all_reduce of two D-vectors; the backward gets them block by block.
    hard negatives  rank q's negative texts travel with txt_q: block (img_r, neg_txt_q)
                   feeds rank r's row lse, and its d neg_txt_q travels home in the
                   accumulator.  Negative images stay home: block (neg_img_r, txt_q)
                   feeds the column accumulator travelling with txt_q, and d neg_img_r
                   is kept.
    matryoshka_dims  every block goes through the nested sweep (``sweeps.NestedSweeps``):
                   each statistic has one row per size (the column lse travels as
                   n_sizes x n floats, merged per size, and with ids so do the positive
                   pairs' dot sums), the loss is the weighted sum over the sizes, the target
                   terms are formed on each size's prefix features, and each block's
                   gradient already carries the prefix normalisation; an off-diagonal
                   block's backward runs its row and column terms apart (d_scale split
                   between two losses), twice its plain work.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from ...core.autograd import autocast_off, bias_guard, bias_meta, finish_grads, first_order_only, fresh_output
from ..targets import match_counts, positive_dots
from .agreement import Layout
from ...core.collectives import TAG_ACC, TAG_IDS, TAG_LSE, TAG_TXT, Ring, wait_all
from .common import FamilyTargets, rowdot, sweep_setup
from .gather import _neg_out, _sub_uniform

_F64 = torch.float64


class _Blocks:
    """What travels: rank q's block is its n_q texts followed by its negative texts (when a
    row softmax takes them), one tensor, so one message carries both."""

    def __init__(self, layout: Layout, tg: FamilyTargets):
        self.sizes = layout.sizes
        self.use_nt = layout.m_txt > 0 and tg.lam > 0.0
        self.use_ni = layout.m_img > 0 and tg.lam < 1.0
        self.nt = layout.neg_txt_sizes if self.use_nt else (0,) * layout.world_size

    def rows(self, q: int) -> int:
        return self.sizes[q] + self.nt[q]

    def block(self, txt, neg_txt):
        return torch.cat([txt, neg_txt]).contiguous() if self.use_nt else txt

    def buffers(self, txt, ids, c_rows: int):
        """The two receive buffers of each thing that travels: text blocks, ids, and an
        (c_rows, n) float64 pack beside them (column statistics, one row per loss size, and
        what the ids need), and c_rows."""
        n_max, dim = max(self.sizes), txt.shape[1]
        blk_max = max(self.rows(q) for q in range(len(self.sizes)))
        return ([txt.new_empty(blk_max, dim) for _ in range(2)],
                None if ids is None else [ids.new_empty(n_max) for _ in range(2)],
                [torch.empty(c_rows * n_max, dtype=_F64, device=txt.device) for _ in range(2)],
                c_rows)

    def acc_len(self, q: int, dim: int) -> int:
        """The backward accumulator of block q: d txt_q, d neg_txt_q, and one d_scale float."""
        return self.rows(q) * dim + 1


class RingClipLoss(torch.autograd.Function):
    """Inputs: (img, txt, scale, bias, group_ids, neg_txt, neg_img, layout)."""

    @staticmethod
    def forward(ctx, img, txt, scale, bias, ids, neg_txt, neg_img, layout: Layout):
        # Long: one loop over the ring's steps whose stages share the buffers in flight (the
        # block being received while this one is swept); split, they would travel as arguments
        # and the overlap of the exchange with the sweep would no longer be visible in one place.
        ops, s, acc, tg = sweep_setup(layout, scale, img)
        blocks = _Blocks(layout, tg)
        w, r, sizes = layout.world_size, layout.rank, layout.sizes
        n, ns = sizes[r], ops.sizes
        img, txt = img.contiguous(), txt.contiguous()
        ring = Ring(layout)
        # The column accumulator: lse partials, and with ids the positive pairs' dot sums
        # (one row of each per loss size).
        blk_buf, ids_buf, col_buf, c_rows = blocks.buffers(txt, ids, ns * (1 if ids is None else 2))
        counts = row_pos = None
        if ids is not None:
            counts = torch.zeros(n, dtype=_F64, device=img.device)
            row_pos = torch.zeros(ops.stats(n), dtype=_F64, device=img.device)
        use_ni = blocks.use_ni and neg_img.shape[0] > 0
        cur_blk, cur_ids = blocks.block(txt, neg_txt), ids
        lse_row = diag = col_in = col_send = None
        col_works: List = []
        for k in range(w):
            q, q_next = (r - k) % w, (r - k - 1) % w
            # 1. Post the next text block's transfer (and its ids); it runs during this sweep.
            works, nxt_blk, nxt_ids = [], None, None
            if k < w - 1:
                nxt_blk = blk_buf[k % 2][:blocks.rows(q_next)]
                sends, recvs, tags = [cur_blk], [nxt_blk], [TAG_TXT]
                if ids is not None:
                    nxt_ids = ids_buf[k % 2][:sizes[q_next]]
                    sends, recvs, tags = sends + [cur_ids], recvs + [nxt_ids], tags + [TAG_IDS]
                works = ring.exchange(sends, recvs, tags)
            cur_txt, cur_nt = cur_blk[:sizes[q]], cur_blk[sizes[q]:]
            # 2. Sweep the block (img_r, txt_q): rows of img_r, columns of txt_q; then rank q's
            #    negative texts (more columns of img_r's rows) and this rank's negative images
            #    (more rows of txt_q's columns).
            row_part, col_part, d = ops.lse(img, cur_txt)
            if k == 0:
                diag = d  # the own block (img_r, txt_r): its diagonal holds the label logits
            lse_row = row_part if lse_row is None else torch.logaddexp(lse_row, row_part)
            if cur_nt.shape[0]:
                lse_row = torch.logaddexp(lse_row, ops.lse(img, cur_nt)[0])
            if use_ni:
                col_part = torch.logaddexp(col_part, ops.lse(neg_img, cur_txt)[1])
            col = col_part.reshape(ns, -1)
            if ids is not None:
                # Global group sizes and the positive pairs' dot products (the own pairs
                # left to the diagonal), per row (kept) and per column (travelling).
                counts += match_counts(ids, cur_ids)
                dots = [positive_dots(x, y, ids, cur_ids, own=k == 0) for _, (x, y) in ops.features(img, cur_txt)]
                row_pos += torch.stack([rp for rp, _ in dots]).reshape(row_pos.shape)
                col = torch.cat([col, torch.stack([cp for _, cp in dots])])
            # 3. Merge into the accumulator travelling with txt_q, then pass it on (after the
            #    last step it arrives home, complete).
            if k > 0:
                wait_all(col_works)
                prev = col_in.view(c_rows, -1)
                col = torch.cat([torch.logaddexp(prev[:ns], col[:ns]), prev[ns:] + col[ns:]])
            col_send = col.reshape(-1).contiguous()
            col_in = col_buf[k % 2][:c_rows * sizes[q_next]]
            col_works = ring.exchange([col_send], [col_in], [TAG_LSE])
            wait_all(works)
            cur_blk, cur_ids = nxt_blk, nxt_ids
        wait_all(col_works)
        home = col_in.view(c_rows, n)
        # This rank's columns, over all N rows (and negative images).
        lse_col = home[:ns].reshape(ops.stats(n)).clone()
        a, b = tg.weights(n)
        loss = a * ops.total(lse_row - diag) + b * ops.total(lse_col - diag)
        if tg.host:
            col_pos = None if ids is None else home[ns:].reshape(ops.stats(n))
            loss = loss + _target_loss(tg, ops, img, txt, neg_txt, neg_img, diag, counts, row_pos, col_pos,
                                       a, b, s, layout)
        ctx.save_for_backward(img, txt, scale, lse_row, lse_col, diag, ids, counts, neg_txt, neg_img)
        ctx.layout = layout
        ctx.bias_meta = bias_meta(bias)
        return fresh_output(loss + bias_guard(bias), layout.opts.loss_dtype or img.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss):
        # Long for the forward's reason: the numbered steps of one ring loop share the text
        # block and the gradient accumulator travelling with it, double-buffered (the
        # block's own sweeps, steps 2-4, are ``_Sweeps.block``).
        img, txt, scale, lse_row, lse_col, diag, ids, counts, neg_txt, neg_img = ctx.saved_tensors
        layout: Layout = ctx.layout
        ops, s, acc, tg = sweep_setup(layout, scale, img)
        blocks = _Blocks(layout, tg)
        w, r, sizes = layout.world_size, layout.rank, layout.sizes
        n, dim, ns = sizes[r], img.shape[1], ops.sizes
        # Every rank's upstream gradient: the column term of block (r, q) belongs to loss_q.
        g = grad_loss.detach().reshape(1).to(acc).contiguous()
        g_all = torch.empty(w, 1, dtype=acc, device=img.device)
        dist.all_gather(list(g_all.unbind(0)), g, group=layout.group)
        g_list = g_all.reshape(-1).tolist()
        coef_row = [gq * tg.weights(nq)[0] for gq, nq in zip(g_list, sizes)]
        coef_col = [gq * tg.weights(nq)[1] for gq, nq in zip(g_list, sizes)]
        ring = Ring(layout)
        # What travels with the texts besides them: the column lse and, with ids, the group sizes.
        blk_buf, ids_buf, pack_buf, c_rows = blocks.buffers(txt, ids, ns + (0 if ids is None else 1))
        acc_max = max(blocks.acc_len(q, dim) for q in range(w))
        acc_buf = [torch.empty(acc_max, dtype=acc, device=img.device) for _ in range(2)]
        sweeps = _Sweeps(ops, s, acc, tg, img, lse_row, diag, ids, counts, neg_img,
                         blocks.use_ni and neg_img.shape[0] > 0)
        own_pack = lse_col.reshape(-1) if ids is None else torch.cat([lse_col.reshape(-1), counts])
        cur_blk, cur_pack, cur_ids = blocks.block(txt, neg_txt), own_pack, ids
        acc_in, acc_send, acc_works = None, None, []
        for k in range(w):
            q, q_next = (r - k) % w, (r - k - 1) % w
            nq, own = sizes[q], k == 0
            # 1. Post the next text block, its column lse (and group sizes, ids).
            works, nxt_blk, nxt_pack, nxt_ids = [], None, None, None
            if k < w - 1:
                nxt_blk = blk_buf[k % 2][:blocks.rows(q_next)]
                nxt_pack = pack_buf[k % 2][:c_rows * sizes[q_next]]
                sends, recvs, tags = [cur_blk, cur_pack], [nxt_blk, nxt_pack], [TAG_TXT, TAG_LSE]
                if ids is not None:
                    nxt_ids = ids_buf[k % 2][:sizes[q_next]]
                    sends, recvs, tags = sends + [cur_ids], recvs + [nxt_ids], tags + [TAG_IDS]
                works = ring.exchange(sends, recvs, tags)
            cur_txt, cur_nt = cur_blk[:nq], cur_blk[nq:]
            cur_lse = cur_pack[:ns * nq].view(ops.stats(nq))
            cur_counts = None if ids is None else cur_pack[ns * nq:]
            # 2.-4. The block's sweep, and its negatives' (``_Sweeps.block``).
            dt, dnt, ds_col = sweeps.block(own, cur_txt, cur_nt, cur_lse, cur_ids, cur_counts,
                                           coef_row[r], coef_col[q])
            # 5. Add d txt_q, d neg_txt_q and the column part of d_scale into the accumulator
            #    travelling with txt_q, and pass it on.
            if k > 0:
                wait_all(acc_works)
                out = acc_in
            else:
                out = torch.zeros(blocks.acc_len(q, dim), dtype=acc, device=img.device)
            out[:nq * dim].view(nq, dim).add_(dt)
            if dnt is not None:
                out[nq * dim:-1].view(-1, dim).add_(dnt)
            out[-1:].add_(torch.as_tensor(ds_col, dtype=_F64, device=img.device).reshape(1))
            acc_send = out
            acc_in = acc_buf[k % 2][:blocks.acc_len(q_next, dim)]
            acc_works = ring.exchange([acc_send], [acc_in], [TAG_ACC])
            wait_all(works)
            cur_blk, cur_pack, cur_ids = nxt_blk, nxt_pack, nxt_ids
        wait_all(acc_works)
        # Home, complete: d txt_r and d neg_txt_r from every rank's blocks, and the column
        # parts of d_scale that belong to this rank's loss.
        d_txt = acc_in[:n * dim].view(n, dim)
        d_nt = acc_in[n * dim:-1].view(-1, dim) if blocks.use_nt else None
        d_scale = sweeps.ds_own + acc_in[-1].to(_F64)
        needs = ctx.needs_input_grad
        out = finish_grads(sweeps.d_img, d_txt, d_scale.to(acc), None, img, txt, scale, ctx.bias_meta, needs)
        grads = out[:4] + (None, _neg_out(d_nt, neg_txt, needs[5]), _neg_out(sweeps.d_ni, neg_img, needs[6]),
                           None)
        return first_order_only("clip_fast's distributed CLIP loss", grads)


class _Sweeps:
    """The ring backward's steps 2-4 on one text block (img_r, txt_q), over what stays fixed
    around the ring, accumulating this rank's own gradients: d img_r, d neg_img_r and the
    part of d_scale that belongs to loss_r."""

    def __init__(self, ops, s, acc, tg: FamilyTargets, img, lse_row, diag, ids, counts, neg_img,
                 use_ni: bool):
        self.ops, self.s, self.acc, self.tg = ops, s, acc, tg
        self.img, self.lse_row, self.diag, self.ids, self.counts = img, lse_row, diag, ids, counts
        self.neg_img = neg_img if use_ni else None
        self.d_img = torch.zeros(img.shape, dtype=acc, device=img.device)
        self.d_ni = torch.zeros(neg_img.shape, dtype=acc, device=img.device) if use_ni else None
        self.ds_own = torch.zeros((), dtype=_F64, device=img.device)

    def block(self, own: bool, cur_txt, cur_nt, cur_lse, cur_ids, cur_counts, a_r: float, b_q: float):
        """(d txt_q, d neg_txt_q or None, the column part of d_scale: loss_q's) of block q."""
        ops, s, acc, tg, img = self.ops, self.s, self.acc, self.tg, self.img
        # 2. One sweep of the block for both directions: rows belong to loss_r, columns
        #    to loss_q.  The own block carries the label targets on its diagonal; the
        #    others split d_scale between the two losses.
        terms = None
        if tg.host:  # the block's target terms (own block: its pairs on the diagonal; else t split)
            terms = ops.host(img, cur_txt, lambda x, y: tg.block(
                x, y, a_r, b_q, acc, positives=True, ids_x=self.ids, ids_y=cur_ids, counts_x=self.counts,
                counts_y=cur_counts, pair_offset=0 if own else None, kernel_diag=own, split_t=not own))
        if own:
            w_diag, t = (a_r + b_q, 0.0) if terms is None else (terms.rest[0], terms.t)
            di, dt, ds = ops.grad(img, cur_txt, self.lse_row, cur_lse, a_r, b_q, w_diag, diag=self.diag)
            self.ds_own += ds.to(_F64) - t
            ds_col = torch.zeros((), dtype=_F64, device=img.device)
        else:
            di, dt, ds = ops.grad(img, cur_txt, self.lse_row, cur_lse, a_r, b_q, 0.0, split_scale=True)
            ds = ds.to(_F64)
            if terms is not None:
                ds = ds - terms.t
            self.ds_own += ds[0]
            ds_col = ds[1]
        if terms is not None:
            ops.sub_terms(di, dt, img, cur_txt, terms)
        self.d_img += di
        # 3. Rank q's negative texts: more columns of rank r's rows (loss_r alone).
        dnt = None
        if cur_nt.shape[0]:
            di, dnt, ds = ops.grad(img, cur_nt, self.lse_row, None, a_r, 0.0, 0.0)
            self.ds_own += ds.to(_F64) - _sub_uniform(tg, ops, di, dnt, img, cur_nt, a_r, 0.0, acc)
            self.d_img += di
        # 4. This rank's negative images: more rows of rank q's columns (loss_q alone).
        if self.neg_img is not None:
            dni, dt2, ds = ops.grad(self.neg_img, cur_txt, None, cur_lse, 0.0, b_q, 0.0)
            ds_col = ds_col + ds.to(_F64) - _sub_uniform(tg, ops, dni, dt2, self.neg_img, cur_txt, 0.0, b_q, acc)
            self.d_ni += dni
            dt += dt2
        if own:  # the own block's column part is this rank's own
            self.ds_own += ds_col
            ds_col = 0.0
        return dt, dnt, ds_col


def _target_loss(tg: FamilyTargets, ops, img, txt, neg_txt, neg_img, diag, counts: Optional[torch.Tensor],
                 row_pos, col_pos, a: float, b: float, s, layout: Layout) -> torch.Tensor:
    """Rank r's target terms beyond the per-pair loss terms (``clip_fast.clip.targets``):
    sum_i (a + b - w_i) S_ii - s * t, with w_i the own pair's target weight and t the
    target sum of every other entry of rank r's rows and columns, from the positive-pair
    sums the ring accumulated and the global feature sums (one all_reduce of two D-vectors
    per loss size); weighted over the sizes (``ops.total``, ``ops.features``)."""
    n, eps = img.shape[0], tg.eps
    c = counts if counts is not None else torch.ones(n, dtype=_F64, device=img.device)
    w_diag = (1.0 - eps) * (a + b) / c + eps * (a * tg.inv_k_row + b * tg.inv_k_col)
    t = torch.zeros((), dtype=_F64, device=img.device)
    if counts is not None:
        t = t + (1.0 - eps) * (a * ops.total(row_pos / c) + b * ops.total(col_pos / c))
    if eps:
        feats = ops.features(img, txt, neg_img, neg_txt)
        sums = torch.zeros(len(feats), 2, img.shape[1], dtype=_F64, device=img.device)
        for k, (_, (x, y, ni, nt)) in enumerate(feats):
            d = x.shape[1]
            sums[k, 0, :d], sums[k, 1, :d] = x.to(_F64).sum(0), y.to(_F64).sum(0)
            if ni is not None:
                sums[k, 0, :d] += ni.to(_F64).sum(0)
            if nt is not None:
                sums[k, 1, :d] += nt.to(_F64).sum(0)
        dist.all_reduce(sums, group=layout.group)  # every image and every text of the group
        for k, (wk, (x, y, _, _)) in enumerate(feats):
            x64, y64, d = x.to(_F64), y.to(_F64), x.shape[1]
            own = rowdot(x64, y64, _F64).sum()      # the own pairs, carried by w_diag
            t = t + wk * eps * a * tg.inv_k_row * (x64.sum(0) @ sums[k, 1, :d] - own)
            t = t + wk * eps * b * tg.inv_k_col * (y64.sum(0) @ sums[k, 0, :d] - own)
    return ops.total((a + b - w_diag) * diag) - s.to(_F64) * t
