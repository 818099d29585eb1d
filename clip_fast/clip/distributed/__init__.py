"""The CLIP loss over a ``torch.distributed`` process group, without N x N logits.

``FastClipLoss(rank=r, world_size=w, ...)`` calls :func:`distributed_clip_loss` when
``w > 1``.  Each rank holds its own shard ``img_r, txt_r`` of ``n_r`` rows; the global
batch is the concatenation in rank order (``N = sum n_r``, rank r's rows start at
``o_r = n_0 + ... + n_{r-1}``) and ``S = scale * IMG @ TXT.T + bias`` is never formed.
Every sweep is a backend call (``lse_forward`` / ``grad_backward``) on a rectangular block.

Modules:
    agreement    one all_gather of a per-rank descriptor, then the same verdict (or the
                 same error) on every rank; the :class:`~.agreement.Layout` of the call
    (the collectives, row all_gather / reduce_scatter, logsumexp across ranks and the
    ring's P2P, are shared with SigLIP: ``clip_fast.core.collectives``)
    gather       ``distributed="gather"``: open_clip's ``ClipLoss`` semantics, all four flags
    ring         ``distributed="ring"``: ``local_loss=True, gather_with_grad=True`` with text
                 blocks travelling around the ring, O(n * D) memory per rank

Unequal shard sizes are supported in both modes: labels are offset by ``o_r`` and every
mean is over the rows it covers (open_clip itself cannot gather unequal shards).
The options of ``clip_fast.clip.targets`` (positive groups, label smoothing, direction weight,
hard negatives) take global semantics in both modes: group sizes over the global batch,
every rank's hard negatives in every softmax (see :func:`distributed_clip_loss`).
All ranks must call the loss, and its backward, in the same order (as with open_clip's gather).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ...core.autograd import apply_function
from ...core.checks import MODES, aliased
from ...core.distributed import require_initialized
from .agreement import check_across_ranks
from .gather import GatherClipLoss
from .ring import RingClipLoss

__all__ = ["MODES", "distributed_clip_loss"]


def distributed_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                          logit_bias=None, *, rank: int, world_size: int, local_loss: bool = False,
                          gather_with_grad: bool = False, distributed: Optional[str] = None,
                          backend: str = "auto", chunk_size: Optional[int] = None, group=None,
                          group_ids=None, label_smoothing: float = 0.0, image_to_text_weight: float = 0.5,
                          negative_text_features=None, negative_image_features=None,
                          mode: Optional[str] = None, matryoshka_dims: Optional[Sequence[int]] = None,
                          matryoshka_weights: Optional[Sequence[float]] = None,
                          matryoshka_renormalize: bool = True) -> torch.Tensor:
    """The CLIP loss of a batch sharded over ``group`` (default: the world), as a scalar.

    Args:
        image_features, text_features: this rank's (n_r, D) shard; n_r may differ across ranks.
        logit_scale, logit_bias: as in ``clip_loss``; must be bitwise equal on every rank.
        rank, world_size: this process's rank in ``group`` and the group's size (checked).
        local_loss, gather_with_grad: open_clip's meaning (``distributed="gather"``).
        distributed: "gather" (the default: open_clip's semantics) or "ring" (requires
            ``local_loss=True`` and ``gather_with_grad=True``: those are the semantics it
            computes); the name ``FastClipLoss`` takes.  ``mode`` is accepted as another name.
        backend, chunk_size: as in ``clip_loss``.
        group: a ``torch.distributed`` process group, or None for the default group.
        group_ids: this rank's (n_r,) integer ids, or None (on every rank).  Pairs with equal
            ids are positives of each other across ranks too; a row's target is uniform over
            its positives in the whole global batch (group sizes are global).
        label_smoothing: epsilon in [0, 1), uniform over each softmax's global classes:
            K = N + M_t for an image row (every rank's negative texts), N + M_i for a
            text column.  Must be equal on every rank.
        image_to_text_weight: lambda in [0, 1]; loss = lambda * CE(image -> text)
            + (1 - lambda) * CE(text -> image).  Must be equal on every rank.
        negative_text_features, negative_image_features: this rank's (M_r, D) hard
            negatives, or None (on every rank; M_r may differ across ranks and be 0).
            Every rank's negative texts join every image's softmax and every rank's
            negative images every text's softmax; their gradients follow the features'
            rule (``gather_with_grad``; ring mode: every rank's loss reaches the owner).
        matryoshka_dims, matryoshka_weights, matryoshka_renormalize: as in ``clip_loss``
            (equal on every rank): each rank's loss is the weighted sum over the sizes of
            its loss above on the (re-normalised) prefixes, every size of a block from one
            nested sweep over D (Triton or torch backend, chosen as in ``clip_loss``), with
            every option above applied to each size.

    Each rank's loss is open_clip's ``ClipLoss`` generalised to these options on that rank:
    with ``local_loss`` ``lambda / n_r * sum of its rows' CE + (1 - lambda) / n_r * sum of
    its columns' CE`` over the global softmaxes, otherwise the global loss; its gradients
    (``d_logit_scale`` included, in both modes) are what autograd gives through open_clip's
    gather on that rank.

    Every rank must call this (and the backward) collectively.  A bad shard or mismatched
    options on any rank make every rank raise the same ValueError.
    """
    distributed = aliased("distributed_clip_loss", "distributed", distributed, "mode", mode, "gather")
    require_initialized(world_size)
    layout, call = check_across_ranks(
        image_features, text_features, logit_scale, logit_bias, rank=rank, world_size=world_size,
        local_loss=local_loss, gather_with_grad=gather_with_grad, mode=distributed, backend=backend,
        chunk_size=chunk_size, group=group, group_ids=group_ids, label_smoothing=label_smoothing,
        image_to_text_weight=image_to_text_weight, negative_text_features=negative_text_features,
        negative_image_features=negative_image_features,
        matryoshka=(matryoshka_dims, matryoshka_weights, matryoshka_renormalize))
    fn = RingClipLoss if distributed == "ring" else GatherClipLoss
    return apply_function(fn, call.opts.loss_dtype, call.img, call.txt, call.scale, call.bias, call.ids,
                          call.neg_txt, call.neg_img, layout)
