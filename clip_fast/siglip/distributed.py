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
With ``matryoshka_dims``, every block goes through the nested sweep
(``backends.nested_torch``): its gradients are those of the raw features, each size's prefix
normalisation chain already applied (the chain is linear in a block's contributions), so the
exchanges are unchanged and loss_r is the weighted sum over the sizes of the loss above.

forward:  the local block and every remote block through the fused SigLIP sweep; loss,
          d img_r, d scale, d bias accumulated (the remote blocks' d txt is not kept).
backward: d txt_q contributions: each remote block is swept again (it gives G @ img_r for
          the owner's texts), scaled by this rank's upstream gradient and sent back to its
          owner, one pairwise exchange per step.  Recomputing them costs the remote S once
          more but keeps memory O(N_local * D): keeping them from the forward would hold
          every rank's (n_q, D) block, O(N_global * D).

Inputs are checked across ranks first (SigLIP's descriptor on the core's agreement,
``clip_fast.core.distributed.share_verdicts``): a bad shard on any rank raises the same
error on every rank, none hangs.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..core.autograd import apply_function, fresh_output, fused_backward, refuse_vmap
from ..core.collectives import TAG_ACC, TAG_IDS, TAG_TXT, Ring, all_gather_rows
from ..core.distributed import (FEATURE_FIELDS, ShardLayout, agree_features, agree_needs_grad, check_comm_device,
                                features_row, mismatch, require_initialized, share_verdicts)
from ..core.matryoshka import NestedOptions
from .function import block_sweep
from .functional import Call, prepare_call

# open_clip's exchanges of the other ranks' texts (``SigLipLoss(dist_impl=...)``).
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
_LOSS = "clip_fast distributed SigLIP loss"
_FIELDS = FEATURE_FIELDS + ("dist_impl", "matryoshka")  # a descriptor row (``_describe``)


@dataclass(frozen=True)
class SigLipLayout(ShardLayout):
    """Everything the Function needs besides tensors (the same on every rank)."""
    dist_impl: str
    backend: str                       # resolved SigLIP backend name
    need_grad: bool
    chunk_size: Optional[int]
    loss_dtype: Optional[torch.dtype]
    nested: Optional[NestedOptions] = None  # Matryoshka sizes: every block through the nested sweep

    def block(self) -> Callable:
        return block_sweep(self.backend, self.chunk_size, self.nested)


def distributed_siglip_loss(image_features, text_features, logit_scale, logit_bias=None, *,
                            group_ids=None, rank: int, world_size: int, dist_impl: str = "bidir",
                            backend: str = "auto", chunk_size: Optional[int] = None, group=None,
                            matryoshka_dims=None, matryoshka_weights=None, matryoshka_renormalize=True):
    """This rank's SigLIP loss with open_clip's distributed semantics (module doc); with
    ``matryoshka_dims``, the weighted sum over the sizes, every block through the nested sweep."""
    require_initialized(world_size)
    matryoshka = dict(matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights,
                      matryoshka_renormalize=matryoshka_renormalize)
    layout, call = check_across_ranks(image_features, text_features, logit_scale, logit_bias, group_ids,
                                      rank=rank, world_size=world_size, dist_impl=dist_impl,
                                      backend=backend, chunk_size=chunk_size, group=group, **matryoshka)
    return apply_function(DistSigLipLoss, layout.loss_dtype, call.img, call.txt, call.scale, call.bias,
                          call.ids, layout)[0]


def _local_call(img, txt, logit_scale, logit_bias, group_ids, dist_impl, backend, chunk_size,
                comm_name, matryoshka) -> Call:
    """This rank's own checks (raising here alone would leave the other ranks hanging)."""
    if dist_impl not in DIST_IMPLS:
        raise ValueError(f"dist_impl must be one of {DIST_IMPLS}, got {dist_impl!r}")
    call = prepare_call(img, txt, logit_scale, logit_bias, group_ids, backend, chunk_size, **matryoshka)
    check_comm_device(comm_name, call.img)
    return call


def _describe(call: Optional[Call], rank, world_size, dist_impl) -> List[int]:
    """The core's shared fields, then the index of ``dist_impl`` (-1 unknown) and a checksum
    of the Matryoshka options (0: none)."""
    ok = call is not None
    shared = features_row(call.img if ok else None, call.scale if ok else None, call.bias if ok else None,
                          rank, world_size, ok and call.opts.need_grad, ok and call.ids is not None)
    nested = call.opts.nested if ok else None
    return shared + [DIST_IMPLS.index(dist_impl) if dist_impl in DIST_IMPLS else -1,
                     0 if nested is None else 1 + zlib.crc32(repr(nested).encode())]


def check_across_ranks(img, txt, logit_scale, logit_bias, group_ids, *, rank, world_size, dist_impl,
                       backend, chunk_size, group, **matryoshka) -> Tuple[SigLipLayout, Call]:
    """Check this rank's call, share the verdicts, and raise the same error on every rank."""
    group_size = dist.get_world_size(group)
    comm_name = str(dist.get_backend(group)).lower()
    call, rows = share_verdicts(
        lambda: _local_call(img, txt, logit_scale, logit_bias, group_ids, dist_impl, backend, chunk_size,
                            comm_name, matryoshka),
        lambda call: _describe(call, rank, world_size, dist_impl), group, img, _LOSS)
    def field(name):
        k = _FIELDS.index(name)
        return [row[k] for row in rows]

    agree_features(field, group_size, _LOSS)
    if len(set(field("dist_impl"))) > 1:
        mismatch("dist_impl", [DIST_IMPLS[v] for v in field("dist_impl")], loss=_LOSS)
    if len(set(field("matryoshka"))) > 1:
        mismatch("the Matryoshka option set (matryoshka_dims, matryoshka_weights, matryoshka_renormalize)",
                 ["None" if v == 0 else f"options checksum {v - 1}" for v in field("matryoshka")],
                 " (pass the same Matryoshka options on every rank)", loss=_LOSS)
    agree_needs_grad(field, _LOSS)
    layout = SigLipLayout(rank=rank, world_size=group_size, sizes=tuple(field("n")), group=group,
                          nccl=comm_name == "nccl", dist_impl=dist_impl, backend=call.opts.backend,
                          need_grad=call.opts.need_grad, chunk_size=call.opts.chunk_size,
                          loss_dtype=call.opts.loss_dtype, nested=call.opts.nested)
    return layout, call


# ---- transport ----

def _swap(lay: SigLipLayout, step: int, txt: torch.Tensor, ids: Optional[torch.Tensor], n_recv: int):
    """Send (txt, ids) to rank r + step; receive rank r - step's, of ``n_recv`` rows."""
    ring = Ring(lay, step)
    txt_q = ring.swap(txt, (n_recv, txt.shape[1]), TAG_TXT)
    ids_q = ring.swap(ids, (n_recv,), TAG_IDS) if ids is not None else None
    return txt_q, ids_q


def _remote_shards(txt: torch.Tensor, ids: Optional[torch.Tensor], lay: SigLipLayout
                   ) -> Iterator[Tuple[int, torch.Tensor, Optional[torch.Tensor]]]:
    """(q, txt_q, ids_q) for every rank q != r, one at a time (module doc)."""
    r, w = lay.rank, lay.world_size
    if lay.dist_impl == "gather":
        all_txt = all_gather_rows(txt, lay)
        all_ids = all_gather_rows(ids, lay) if ids is not None else None
        for q in range(w):
            if q != r:
                o, n = lay.offsets[q], lay.sizes[q]
                yield q, all_txt[o:o + n], (all_ids[o:o + n] if all_ids is not None else None)
        return
    for k in range(1, w):
        frm = (r - k) % w
        yield (frm,) + _swap(lay, k, txt, ids, lay.sizes[frm])


class DistSigLipLoss(torch.autograd.Function):
    """Inputs: (img, txt, scale, bias, ids, layout); the loss of this rank (module doc)."""

    @staticmethod
    def forward(img, txt, scale, bias, ids, lay: SigLipLayout):
        block = lay.block()
        loss, d_img, d_txt, d_scale, d_bias = block(img, txt, scale, bias, ids, ids, True, lay.need_grad)
        for _q, txt_q, ids_q in _remote_shards(txt, ids, lay):
            l_q, di_q, _, ds_q, db_q = block(img, txt_q, scale, bias, ids, ids_q, False, lay.need_grad)
            loss = loss + l_q
            if lay.need_grad:
                d_img += di_q
                d_scale = d_scale + ds_q
                d_bias = d_bias + db_q
        return fresh_output(loss / lay.n_local, lay.loss_dtype or img.dtype), d_img, d_txt, d_scale, d_bias

    @staticmethod
    def setup_context(ctx, inputs, output):
        img, txt, scale, bias, ids, lay = inputs
        _, d_img, d_txt, d_scale, d_bias = output
        ctx.lay = lay
        ctx.meta = [(t.dtype, t.shape) if t is not None else None for t in (img, txt, scale, bias)]
        ctx.save_for_backward(img, txt, scale, bias, ids, d_img, d_txt, d_scale, d_bias)
        ctx.mark_non_differentiable(d_img, d_txt, d_scale, d_bias)

    @staticmethod
    def _grads(ctx, grad_loss):
        img, txt, scale, bias, ids, d_img, d_txt, d_scale, d_bias = ctx.saved_tensors
        lay: SigLipLayout = ctx.lay
        if not lay.need_grad:
            raise RuntimeError("clip_fast's distributed SigLIP loss was computed without gradients, "
                               "so it cannot be backpropagated")
        block = lay.block()
        (img_dt, _), (txt_dt, _), (scale_dt, scale_shape), bias_meta = ctx.meta
        g = grad_loss.detach().to(torch.float64) / lay.n_local
        gi = g.to(d_img.dtype)
        # Every rank's loss reaches this rank's texts: the local block's share, then one
        # remote block per step, recomputed by its image owner and sent back here.
        total_txt = d_txt * gi
        r, w = lay.rank, lay.world_size
        for k in range(1, w):
            frm = (r - k) % w
            # Texts of rank frm (they are needed again: the forward kept none).
            txt_q, ids_q = _swap(lay, k, txt, ids, lay.sizes[frm])
            _, _, dt_q, _, _ = block(img, txt_q, scale, bias, ids, ids_q, False, True)
            # Send my share of d txt_frm back to frm; receive rank r + k's share of my d txt.
            total_txt += Ring(lay, -k).swap(dt_q * gi, tuple(txt.shape), TAG_ACC)
        needs = ctx.needs_input_grad
        out_img = (d_img * gi).to(img_dt) if needs[0] else None
        out_txt = total_txt.to(txt_dt) if needs[1] else None
        out_scale = (d_scale * g).to(scale_dt).reshape(scale_shape) if needs[2] else None
        out_bias = None
        if bias_meta is not None and needs[3]:
            out_bias = (d_bias * g).to(bias_meta[0]).reshape(bias_meta[1])
        return out_img, out_txt, out_scale, out_bias, None, None

    backward = fused_backward("clip_fast's distributed SigLIP loss", _grads.__func__)

    vmap = refuse_vmap("clip_fast's distributed SigLIP loss", "call it once per batch element")
