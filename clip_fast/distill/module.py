"""``FastDistillClipLoss``: open_clip's ``DistillClipLoss`` (constructor and call), fused."""
from __future__ import annotations

from typing import Optional

import torch

from ..clip.module import FastClipLoss
from . import backends as distill_backends
from .distributed import distributed_distill_loss
from .functional import distill_loss


class FastDistillClipLoss(FastClipLoss):
    """open_clip's ``DistillClipLoss`` (constructor and call), fused.

    ``forward(image_features, text_features, logit_scale, dist_image_features,
    dist_text_features, dist_logit_scale, output_dict=False)`` returns
    ``(contrastive_loss, distill_loss)``, or ``{"contrastive_loss": ..., "distill_loss": ...}``.
    The contrastive part is ``FastClipLoss``'s; the distillation term is computed by
    :func:`distill_loss` (or :func:`distributed_distill_loss` when ``world_size > 1``,
    open_clip's gather semantics; ``distributed="ring"`` is refused).  ``backend``:
    "auto", "torch" or "triton" ("cuda" raises: there is no CUDA-extension kernel for
    the distillation term).  Other arguments as ``FastClipLoss``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: str = "auto",
                 chunk_size: Optional[int] = None, distributed: str = "gather", group=None):
        if backend == "cuda":
            distill_backends.resolve_backend("cuda", torch.device("cuda"), torch.float32)  # raises, naming the others
        if distributed != "gather":
            raise ValueError(f"FastDistillClipLoss supports distributed='gather' only, got {distributed!r}")
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad,
                         cache_labels=cache_labels, rank=rank, world_size=world_size,
                         use_horovod=use_horovod, backend=backend, chunk_size=chunk_size,
                         distributed=distributed, group=group)

    def forward(self, image_features, text_features, logit_scale, dist_image_features,
                dist_text_features, dist_logit_scale, output_dict: bool = False):
        contrastive = super().forward(image_features, text_features, logit_scale)
        if self.world_size > 1:
            distill = distributed_distill_loss(
                image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale, rank=self.rank, world_size=self.world_size, local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad, backend=self.backend, chunk_size=self.chunk_size,
                group=self.group)
        else:
            distill = distill_loss(image_features, text_features, logit_scale, dist_image_features,
                                   dist_text_features, dist_logit_scale, backend=self.backend,
                                   chunk_size=self.chunk_size)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill
