"""Ring mode: the ``local_loss=True, gather_with_grad=True`` semantics without ever holding
another rank's whole embeddings; text blocks travel around the ring.

At step k rank r holds ``txt_q`` (q = r - k mod w) and sweeps the block (img_r, txt_q) once:

    forward   the block's row lse partials merge into img_r's running lse_row (kept);
              its column partials merge (logaddexp) into an accumulator that travels
              with txt_q and arrives home complete after w hops.
    backward  the block's G = c_r P_row + c_q P_col (- 2 c_r I on the own block) gives
              d img_r (kept) and d txt_q, which adds into an accumulator that travels
              with txt_q and arrives home complete.  Each tile is swept once per pass
              for both directions; c_q = g_q / (2 n_q) with g_q rank q's upstream gradient.
    per step  forward: txt block (n D elements, input dtype) + n floats;
              backward: txt block + n floats + the n x D float32 gradient accumulator.
    overlap   the next text block is posted (isend/irecv) before the current block's
              sweep; the small accumulators are posted after it and only waited for
              when the next block merges them, one sweep later.
    memory    O(n_max * D) per rank: two text buffers and two accumulators, whatever w is.

``d_logit_scale``: each block's sweep yields one scalar that mixes rank r's own loss (rows)
and rank q's loss (columns), so a rank cannot isolate the gradient of its own loss without
a second sweep.  Every rank gets the average ``(1/w) sum_q d loss_q / d scale`` (one
all_reduce of one float).  Summed or averaged over ranks, as DDP does, this equals
open_clip's per-rank values exactly; the per-rank values themselves differ from open_clip's.
Feature gradients match open_clip per rank exactly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .._autograd import autocast_off, first_order_only, fresh_output
from ..autograd import bias_meta, finish_grads
from ..backends import compute_dtype
from .agreement import Layout
from .collectives import TAG_ACC, TAG_LSE, TAG_TXT, Ring, wait_all
from .common import backend_args, rowdot


class RingClipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, scale, bias, layout: Layout):
        acc = compute_dtype(img.dtype)
        impl, kw, s = backend_args(layout, scale, acc)
        w, r, sizes = layout.world_size, layout.rank, layout.sizes
        n_max, dim = max(sizes), img.shape[1]
        img, txt = img.contiguous(), txt.contiguous()
        ring = Ring(layout)
        txt_buf = [txt.new_empty(n_max, dim) for _ in range(2)]
        lse_buf = [torch.empty(n_max, dtype=torch.float64, device=img.device) for _ in range(2)]
        cur_txt, lse_row, col_acc, col_in, col_works = txt, None, None, None, []
        for k in range(w):
            q_next = (r - k - 1) % w  # the block this rank holds at step k + 1
            # 1. Post the next text block's transfer; it runs during this block's sweep.
            txt_works, nxt_txt = [], None
            if k < w - 1:
                nxt_txt = txt_buf[k % 2][:sizes[q_next]]
                txt_works = ring.exchange([cur_txt], [nxt_txt], [TAG_TXT])
            # 2. Sweep the block (img_r, txt_q): rows of img_r, columns of txt_q.
            row_part, col_part, _ = impl.lse_forward(img, cur_txt, s, None, **kw)
            lse_row = row_part if lse_row is None else torch.logaddexp(lse_row, row_part)
            # 3. Merge the column partials into the accumulator travelling with txt_q,
            #    then pass it on (after the last step it arrives home, complete).
            if k > 0:
                wait_all(col_works)
                col_part = torch.logaddexp(col_in, col_part)
            col_acc = col_part
            col_in = lse_buf[k % 2][:sizes[q_next]]
            col_works = ring.exchange([col_acc], [col_in], [TAG_LSE])
            wait_all(txt_works)
            cur_txt = nxt_txt
        wait_all(col_works)
        lse_col = col_in.clone()  # this rank's columns, over all N rows
        diag = s * rowdot(img, txt, acc)
        loss = ((lse_row - diag).mean() + (lse_col - diag).mean()) / 2
        ctx.save_for_backward(img, txt, scale, lse_row, lse_col)
        ctx.layout = layout
        ctx.bias_meta = bias_meta(bias)
        return fresh_output(loss, layout.opts.loss_dtype or img.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss):
        img, txt, scale, lse_row, lse_col = ctx.saved_tensors
        layout: Layout = ctx.layout
        acc = compute_dtype(img.dtype)
        impl, kw, s = backend_args(layout, scale, acc)
        w, r, sizes = layout.world_size, layout.rank, layout.sizes
        n_max, dim = max(sizes), img.shape[1]
        # Every rank's upstream gradient: the column term of block (r, q) belongs to loss_q.
        g = grad_loss.detach().reshape(1).to(acc).contiguous()
        g_all = torch.empty(w, 1, dtype=acc, device=img.device)
        dist.all_gather(list(g_all.unbind(0)), g, group=layout.group)
        coef = [gq / (2 * nq) for gq, nq in zip(g_all.reshape(-1).tolist(), sizes)]
        ring = Ring(layout)
        txt_buf = [txt.new_empty(n_max, dim) for _ in range(2)]
        lse_buf = [torch.empty(n_max, dtype=torch.float64, device=img.device) for _ in range(2)]
        acc_buf = [torch.empty(n_max, dim, dtype=acc, device=img.device) for _ in range(2)]
        d_img = torch.zeros(img.shape, dtype=acc, device=img.device)
        d_scale = torch.zeros((), dtype=acc, device=img.device)
        cur_txt, cur_lse, acc_in, acc_works = txt, lse_col, None, []
        for k in range(w):
            q, q_next = (r - k) % w, (r - k - 1) % w
            # 1. Post the next text block and its column lse.
            works, nxt_txt, nxt_lse = [], None, None
            if k < w - 1:
                nxt_txt = txt_buf[k % 2][:sizes[q_next]]
                nxt_lse = lse_buf[k % 2][:sizes[q_next]]
                works = ring.exchange([cur_txt, cur_lse], [nxt_txt, nxt_lse], [TAG_TXT, TAG_LSE])
            # 2. One sweep of the block for both directions: rows belong to loss_r,
            #    columns to loss_q; the labels (diagonal) only in the own block.
            di, dt, ds = impl.grad_backward(img, cur_txt, s, None, lse_row, cur_lse, coef[r], coef[q],
                                            2 * coef[r] if q == r else 0.0, **kw)
            d_img += di
            d_scale += ds
            # 3. Add d txt_q into the accumulator travelling with txt_q and pass it on.
            if k > 0:
                wait_all(acc_works)
                dt = acc_in.add_(dt)
            acc_in = acc_buf[k % 2][:sizes[q_next]]
            acc_works = ring.exchange([dt], [acc_in], [TAG_ACC])
            wait_all(works)
            cur_txt, cur_lse = nxt_txt, nxt_lse
        wait_all(acc_works)
        d_txt = acc_in  # d txt_r from every rank's block, complete
        # d_scale: the average over ranks of d loss_q / d scale (see the module docstring).
        dist.all_reduce(d_scale, group=layout.group)
        d_scale = d_scale / w
        return first_order_only("clip_fast's distributed CLIP loss",
                                finish_grads(d_img, d_txt, d_scale, None, img, txt, scale,
                                             ctx.bias_meta, ctx.needs_input_grad))
