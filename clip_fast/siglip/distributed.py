"""Distributed SigLIP: open_clip's ``SigLipLoss(world_size > 1)`` semantics.

Rank r holds img_r, txt_r (n_r rows; shards may be unequal).  Its loss is open_clip's
    loss_r = ( block(img_r, txt_r, positives on the diagonal)
               + sum_{q != r} block(img_r, txt_q, negatives only) ) / n_r
with block = sum_ij softplus(-z_ij S_ij), and the gradients are those of open_clip's
exchanges "with grad": d img_r and d scale, d bias from loss_r alone, while
    d txt_q = sum_r d loss_r / d txt_q        (every rank's loss reaches every text shard).
All four ``dist_impl`` values of open_clip ("bidir", "shift", "reduce", "gather") define
the same loss and gradients; they differ in how texts travel:
  * "gather": one all_gather of every rank's texts (O(N_global * D) per rank, as
    open_clip's gather);
  * "bidir", "shift", "reduce": pairwise exchanges, step k sends txt_r to rank r + k and
    receives txt_{r-k}: one remote shard at a time, O(N_local * D) per rank.  (open_clip's
    bidir/shift pass shards along the ring, its reduce all-reduces each shard; the
    results are the same, the message pattern is not reproduced.)
With ``group_ids``, z_ij = +1 wherever ids are equal, across ranks too (an extension:
open_clip has no ids); ids travel with the texts.

forward:  the local block and every remote block through the fused SigLIP sweep; loss,
          d img_r, d scale, d bias accumulated (the remote blocks' d txt is not kept).
backward: d txt_q contributions: each remote block is swept again (it gives G @ img_r for
          the owner's texts), scaled by this rank's upstream gradient and sent back to its
          owner, one pairwise exchange per step.  Recomputing them costs the remote S once
          more but keeps memory O(N_local * D): keeping them from the forward would hold
          every rank's (n_q, D) block, O(N_global * D).

Inputs are checked across ranks first (``clip_fast.clip.distributed``'s descriptor check): a
bad shard on any rank raises the same error on every rank, none hangs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import backends as siglip_backends
from ..core.autograd import autocast_off, first_order_only, fresh_output
from ..clip.distributed.agreement import Layout, _comm_device, check_across_ranks
from ..core.collectives import all_gather_rows
from ..core.numerics import backend_scalar
from ..core.checks import check_group_ids

# open_clip's exchanges of the other ranks' texts (``SigLipLoss(dist_impl=...)``).
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


@dataclass(frozen=True)
class _DistOptions:
    layout: Layout
    dist_impl: str
    backend: str       # resolved SigLIP backend name
    need_grad: bool
    has_ids: bool


def distributed_siglip_loss(image_features, text_features, logit_scale, logit_bias=None, *,
                            group_ids=None, rank: int, world_size: int, dist_impl: str = "bidir",
                            backend: str = "auto", chunk_size: Optional[int] = None, group=None):
    """This rank's SigLIP loss with open_clip's distributed semantics (module doc)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"clip_fast: world_size={world_size} > 1 needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group, e.g. under torchrun)")
    # The CLIP loss's descriptor check (shapes, dtypes, devices, equal scale and bias, who
    # needs gradients), asked for the one mode whose checks all apply here.
    layout, call = check_across_ranks(
        image_features, text_features, logit_scale, logit_bias, rank=rank, world_size=world_size,
        local_loss=True, gather_with_grad=True, mode="ring", backend=backend,
        chunk_size=chunk_size, group=group)
    img, txt, scale, bias = call.img, call.txt, call.scale, call.bias
    ids = _check_siglip_across_ranks(group_ids, img, dist_impl, layout)
    impl = siglip_backends.resolve_backend(backend, img.device, img.dtype)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (img, txt, scale, bias))
    opts = _DistOptions(layout=layout, dist_impl=dist_impl, backend=impl.NAME, need_grad=need_grad,
                        has_ids=ids is not None)
    if layout.opts.loss_dtype is not None:
        with torch.autocast(img.device.type, enabled=False):
            return _DistSigLipLoss.apply(img, txt, scale, bias, ids, opts)
    return _DistSigLipLoss.apply(img, txt, scale, bias, ids, opts)


def _check_siglip_across_ranks(group_ids, img, dist_impl, layout: Layout) -> Optional[torch.Tensor]:
    """group_ids and dist_impl, checked locally and then agreed by every rank."""
    local_error = None
    ids = None
    try:
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS}, got {dist_impl!r}")
        ids = check_group_ids(group_ids, img)
    except Exception as exc:  # raised alone, it would leave the other ranks hanging
        local_error = f"{type(exc).__name__}: {exc}"
    header = torch.tensor([int(local_error is not None),
                           DIST_IMPLS.index(dist_impl) if dist_impl in DIST_IMPLS else -1,
                           int(group_ids is not None)], dtype=torch.int64,
                          device=_comm_device(layout.group, img))
    gathered = [torch.empty_like(header) for _ in range(layout.world_size)]
    dist.all_gather(gathered, header, group=layout.group)
    rows = [t.tolist() for t in gathered]
    bad = [q for q, row in enumerate(rows) if row[0]]
    if bad:
        messages: List[Optional[str]] = [None] * layout.world_size
        dist.all_gather_object(messages, local_error, group=layout.group)
        detail = "\n".join(f"  rank {q}: {messages[q]}" for q in bad)
        raise ValueError(f"clip_fast distributed SigLIP loss: invalid input on rank(s) {bad}:\n{detail}")
    if len({row[1] for row in rows}) > 1:
        listing = ", ".join(f"rank {q}: {DIST_IMPLS[row[1]]}" for q, row in enumerate(rows))
        raise ValueError(f"clip_fast distributed SigLIP loss: dist_impl differs across ranks ({listing})")
    if len({row[2] for row in rows}) > 1:
        listing = ", ".join(f"rank {q}: {bool(row[2])}" for q, row in enumerate(rows))
        raise ValueError("clip_fast distributed SigLIP loss: whether group_ids is given differs across "
                         f"ranks ({listing})")
    return ids


# ---- transport ----

def _exchange(send: torch.Tensor, to: int, recv_shape, frm: int, layout: Layout) -> torch.Tensor:
    """Send ``send`` to rank ``to`` and receive a ``recv_shape`` tensor from rank ``frm``."""
    ranks = dist.get_process_group_ranks(layout.group) if layout.group is not None else None
    g_to = ranks[to] if ranks else to
    g_frm = ranks[frm] if ranks else frm
    recv = send.new_empty(recv_shape)
    ops = [dist.P2POp(dist.isend, send.contiguous(), g_to, group=layout.group),
           dist.P2POp(dist.irecv, recv, g_frm, group=layout.group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return recv


def _remote_shards(txt: torch.Tensor, ids: Optional[torch.Tensor], opts: _DistOptions
                   ) -> Iterator[Tuple[int, torch.Tensor, Optional[torch.Tensor]]]:
    """(q, txt_q, ids_q) for every rank q != r, one at a time (module doc)."""
    lay = opts.layout
    r, w = lay.rank, lay.world_size
    if opts.dist_impl == "gather":
        all_txt = all_gather_rows(txt, lay)
        all_ids = all_gather_rows(ids, lay) if ids is not None else None
        for q in range(w):
            if q != r:
                o, n = lay.offsets[q], lay.sizes[q]
                yield q, all_txt[o:o + n], (all_ids[o:o + n] if all_ids is not None else None)
        return
    for k in range(1, w):
        to, frm = (r + k) % w, (r - k) % w
        txt_q = _exchange(txt, to, (lay.sizes[frm], txt.shape[1]), frm, lay)
        ids_q = _exchange(ids, to, (lay.sizes[frm],), frm, lay) if ids is not None else None
        yield frm, txt_q, ids_q


class _DistSigLipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, scale, bias, ids, opts: _DistOptions):
        impl = siglip_backends.get_loaded(opts.backend)
        lay = opts.layout
        chunk = lay.opts.chunk_size
        kw = {"chunk_size": chunk} if opts.backend == "torch" and chunk else {}
        s, b = backend_scalar(scale, img), backend_scalar(bias, img)
        loss, d_img, d_txt, d_scale, d_bias = impl.siglip_block(
            img, txt, s, b, ids, ids, True, opts.need_grad, **kw)
        for _q, txt_q, ids_q in _remote_shards(txt, ids, opts):
            l_q, di_q, _, ds_q, db_q = impl.siglip_block(
                img, txt_q, s, b, ids, ids_q, False, opts.need_grad, **kw)
            loss = loss + l_q
            if opts.need_grad:
                d_img += di_q
                d_scale = d_scale + ds_q
                d_bias = d_bias + db_q
        ctx.opts = opts
        ctx.kw = kw
        ctx.scalars = (s, b)
        ctx.meta = [(t.dtype, t.shape) if t is not None else None for t in (img, txt, scale, bias)]
        ctx.save_for_backward(img, txt, ids, d_img, d_txt, d_scale, d_bias)
        return fresh_output(loss / lay.n_local, lay.opts.loss_dtype or img.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss):
        with torch.no_grad():
            grads = _DistSigLipLoss._grads(ctx, grad_loss)
        return first_order_only("clip_fast's distributed SigLIP loss", grads)

    @staticmethod
    def _grads(ctx, grad_loss):
        img, txt, ids, d_img, d_txt, d_scale, d_bias = ctx.saved_tensors
        opts: _DistOptions = ctx.opts
        lay = opts.layout
        if not opts.need_grad:
            raise RuntimeError("clip_fast's distributed SigLIP loss was computed without gradients, "
                               "so it cannot be backpropagated")
        impl = siglip_backends.get_loaded(opts.backend)
        (img_dt, _), (txt_dt, _), (scale_dt, scale_shape), bias_meta = ctx.meta
        g = grad_loss.detach().to(torch.float64) / lay.n_local
        gi = g.to(d_img.dtype)
        # Every rank's loss reaches this rank's texts: the local block's share, then one
        # remote block per step, recomputed by its image owner and sent back here.
        total_txt = d_txt * gi
        r, w = lay.rank, lay.world_size
        s, b = ctx.scalars
        for k in range(1, w):
            to, frm = (r + k) % w, (r - k) % w
            # Texts of rank frm (they are needed again: the forward kept none).
            txt_q = _exchange(txt, to, (lay.sizes[frm], txt.shape[1]), frm, lay)
            ids_q = _exchange(ids, to, (lay.sizes[frm],), frm, lay) if ids is not None else None
            _, _, dt_q, _, _ = impl.siglip_block(img, txt_q, s, b, ids, ids_q, False, True, **ctx.kw)
            # Send my share of d txt_frm back to frm; receive rank to's share of my d txt.
            total_txt += _exchange((dt_q * gi).contiguous(), frm, tuple(txt.shape), to, lay)
        needs = ctx.needs_input_grad
        out_img = (d_img * gi).to(img_dt) if needs[0] else None
        out_txt = total_txt.to(txt_dt) if needs[1] else None
        out_scale = (d_scale * g).to(scale_dt).reshape(scale_shape) if needs[2] else None
        out_bias = None
        if bias_meta is not None and needs[3]:
            out_bias = (d_bias * g).to(bias_meta[0]).reshape(bias_meta[1])
        return out_img, out_txt, out_scale, out_bias, None, None

