"""The distillation term with ``world_size > 1``: open_clip's gather semantics (``clip_fast.distill``'s doc)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..core.distributed import require_initialized
from .function import DistillOptions, block
from .functional import prepare


def gather_like_open_clip(x: torch.Tensor, *, local_loss: bool, gather_with_grad: bool, rank: int,
                          world_size: int, group=None) -> torch.Tensor:
    """All ranks' ``x`` concatenated as open_clip's ``gather_features`` builds it.

    With grad (``torch.distributed.nn.all_gather``) when ``gather_with_grad``; else
    constant copies, with this rank's own ``x`` (and its gradient) put back unless
    ``local_loss``.  Shards must have equal sizes, as open_clip's gather requires.
    """
    if gather_with_grad:
        from torch.distributed.nn import all_gather  # the autograd-aware collective

        return torch.cat(all_gather(x, group=group) if group is not None else all_gather(x), dim=0)
    parts = [torch.zeros_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    if not local_loss:
        parts[rank] = x
    return torch.cat(parts, dim=0)


def distributed_distill_loss(image_features, text_features, logit_scale, dist_image_features,
                             dist_text_features, dist_logit_scale, *, rank: int, world_size: int,
                             local_loss: bool = False, gather_with_grad: bool = False,
                             backend: str = "auto", chunk_size: Optional[int] = None, group=None):
    """The distillation term of open_clip's ``DistillClipLoss`` with ``world_size > 1`` (gather mode).

    Every rank must call it (and its backward) collectively, with equal shard sizes.
    """
    require_initialized(world_size)
    img, txt, scale, timg, ttxt, tscale, loss_dtype, name = prepare(
        image_features, text_features, logit_scale, dist_image_features, dist_text_features,
        dist_logit_scale, backend)
    sizes = [None] * world_size
    dist.all_gather_object(sizes, int(img.shape[0]), group=group)
    if len(set(sizes)) > 1:
        raise ValueError(f"clip_fast distillation loss: the shards' batch sizes differ across ranks ({sizes}); "
                         "open_clip's gather (and so this loss) needs equal shards")
    kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size,
              group=group)
    all_img, all_txt = gather_like_open_clip(img, **kw), gather_like_open_clip(txt, **kw)
    all_timg, all_ttxt = gather_like_open_clip(timg, **kw), gather_like_open_clip(ttxt, **kw)

    def opts(rows, cols):
        return DistillOptions(backend=name, rows=rows, cols=cols, chunk_size=chunk_size, loss_dtype=loss_dtype)

    if not local_loss:
        return block(all_img, all_txt, scale, all_timg, all_ttxt, tscale, opts(True, True))
    # logits_per_image = img_r @ all_txt.T: rows of the block (img_r, all_txt);
    # logits_per_text = txt_r @ all_img.T: columns of the block (all_img, txt_r).
    return (block(img, all_txt, scale, timg, all_ttxt, tscale, opts(True, False))
            + block(all_img, txt, scale, all_timg, ttxt, tscale, opts(False, True)))
