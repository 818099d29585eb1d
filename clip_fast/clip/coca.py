"""``FastCoCaLoss``: open_clip's ``CoCaLoss`` with the contrastive part fused.

CoCa's loss is ``clip_loss_weight * ClipLoss + caption_loss_weight * CE(logits, labels)``
over the caption tokens (``pad_id`` ignored).  The contrastive part is ``FastClipLoss``
(single-process or distributed, nothing N x N); the caption cross-entropy is
``torch.nn.CrossEntropyLoss(ignore_index=pad_id)`` on ``logits.permute(0, 2, 1)``, as
open_clip computes it: it is a (batch, length, vocabulary) softmax with no N x N term,
so there is nothing to fuse there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .module import FastClipLoss


class FastCoCaLoss(FastClipLoss):
    """open_clip's ``CoCaLoss`` (constructor and call), the contrastive part fused.

    ``forward(image_features, text_features, logits, labels, logit_scale, output_dict=False)``
    returns ``(contrastive_loss, caption_loss)``, each already weighted, or
    ``{"contrastive_loss": ..., "caption_loss": ...}``.  With ``clip_loss_weight`` 0 the
    contrastive loss is ``torch.tensor(0)`` on the logits' device and no sweep runs, as in
    open_clip.  Keyword-only ``backend``, ``chunk_size``, ``distributed`` and ``group`` are
    ``FastClipLoss``'s.
    """

    def __init__(self, caption_loss_weight, clip_loss_weight, pad_id: int = 0,
                 local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *,
                 backend: str = "auto", chunk_size: Optional[int] = None, distributed: str = "gather",
                 group=None):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad,
                         cache_labels=cache_labels, rank=rank, world_size=world_size,
                         use_horovod=use_horovod, backend=backend, chunk_size=chunk_size,
                         distributed=distributed, group=group)
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.pad_id = pad_id
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def extra_repr(self) -> str:
        return (f"caption_loss_weight={self.caption_loss_weight}, clip_loss_weight={self.clip_loss_weight}, "
                f"pad_id={self.pad_id}, " + super().extra_repr())

    def forward(self, image_features, text_features, logits, labels, logit_scale, output_dict: bool = False):
        if self.clip_loss_weight:
            clip_loss = self.clip_loss_weight * super().forward(image_features, text_features, logit_scale)
        else:
            clip_loss = torch.tensor(0, device=logits.device)
        caption_loss = self.caption_loss(logits.permute(0, 2, 1), labels) * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss
