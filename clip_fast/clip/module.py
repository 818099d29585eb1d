"""``FastClipLoss``: a drop-in replacement for open_clip's ``ClipLoss``."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from . import backends
from ..core.checks import ScalarLike, check_chunk_size, check_direction_weight, check_label_smoothing, check_mode
from ..core.distributed import check_world_size
from .functional import clip_loss



class FastClipLoss(nn.Module):
    """Symmetric CLIP loss with open_clip's ``ClipLoss`` constructor and call.

    Nothing of size N x N is ever allocated: the loss is computed by a tiled
    forward sweep (row and column log-sum-exp together) and a tiled backward
    sweep that recomputes each tile once.

    Args:
        local_loss, gather_with_grad, rank, world_size: open_clip's meaning, used when
            ``world_size > 1`` (``torch.distributed`` must be initialised).
        cache_labels: accepted for compatibility; clip_fast builds no label tensor.
        use_horovod: not supported (raises NotImplementedError when True).
        backend: "auto", "torch", "triton" or "cuda" (see ``clip_fast.available_backends``).
        chunk_size: rows per strip for the torch backend.
        distributed: "gather" (open_clip's all-gather semantics) or "ring" (blocks passed
            around the ring; O(N_local * D) memory per rank; equals
            ``local_loss=True, gather_with_grad=True``, which it requires).
        group: the ``torch.distributed`` process group (default: the world).
        label_smoothing: epsilon in [0, 1), as in ``torch.nn.CrossEntropyLoss`` (ALIGN: 0.1).
        image_to_text_weight: lambda in [0, 1]: lambda * CE(image -> text)
            + (1 - lambda) * CE(text -> image); 0.5 is CLIP.
        matryoshka_dims, matryoshka_weights, matryoshka_renormalize: the nested-size
            (Matryoshka) loss of ``clip_fast.clip_loss``, every size from one sweep over D
            (Triton or torch backend, in one process and in both distributed modes;
            docs/matryoshka.md).

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False,
    *, group_ids=None, negative_text_features=None, negative_image_features=None)``
    returns the scalar loss, or ``{"contrastive_loss": loss}``. ``logit_bias`` is accepted;
    its gradient is exactly 0 because a shared shift cancels in every softmax.  The
    per-batch options (positive groups, hard negatives) are described in
    ``clip_fast.clip_loss``; with their defaults the loss is open_clip's ``ClipLoss``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: str = "auto",
                 chunk_size: Optional[int] = None, distributed: str = "gather", group=None,
                 label_smoothing: float = 0.0, image_to_text_weight: float = 0.5,
                 matryoshka_dims: Optional[Sequence[int]] = None,
                 matryoshka_weights: Optional[Sequence[float]] = None, matryoshka_renormalize: bool = True):
        super().__init__()
        if use_horovod:
            raise NotImplementedError(
                "FastClipLoss(use_horovod=True) is not supported; use torch.distributed (torchrun) instead"
            )
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + backends.BACKENDS}, got {backend!r}")
        check_mode(distributed, local_loss, gather_with_grad)
        check_world_size(world_size, rank)
        self.local_loss = bool(local_loss)
        self.gather_with_grad = bool(gather_with_grad)
        self.cache_labels = bool(cache_labels)
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = False
        self.backend = backend
        backends.preload(backend)  # import now: torch.compile cannot trace an import
        self.chunk_size = check_chunk_size(chunk_size)
        self.distributed = distributed
        self.group = group
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.image_to_text_weight = check_direction_weight(image_to_text_weight)
        self.matryoshka = None
        if matryoshka_dims is not None:
            from .matryoshka import check_matryoshka

            if backend == "cuda":
                backends.nested_ops("cuda")   # raises: the nested sweep runs on Triton and torch
            # The features' D is not known yet: each call checks the sizes against it.
            self.matryoshka = check_matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_renormalize, None)

    def extra_repr(self) -> str:
        text = (f"backend={self.backend!r}, world_size={self.world_size}, local_loss={self.local_loss}, "
                f"gather_with_grad={self.gather_with_grad}, distributed={self.distributed!r}")
        if self.label_smoothing:
            text += f", label_smoothing={self.label_smoothing}"
        if self.image_to_text_weight != 0.5:
            text += f", image_to_text_weight={self.image_to_text_weight}"
        if self.matryoshka is not None:
            text += f", matryoshka_dims={self.matryoshka.dims}"
        return text

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: ScalarLike, logit_bias: Optional[ScalarLike] = None,
                output_dict: bool = False, *, group_ids: Optional[torch.Tensor] = None,
                negative_text_features: Optional[torch.Tensor] = None,
                negative_image_features: Optional[torch.Tensor] = None):
        options = dict(group_ids=group_ids, label_smoothing=self.label_smoothing,
                       image_to_text_weight=self.image_to_text_weight,
                       negative_text_features=negative_text_features,
                       negative_image_features=negative_image_features,
                       backend=self.backend, chunk_size=self.chunk_size)
        if self.matryoshka is not None:
            options.update(matryoshka_dims=self.matryoshka.dims, matryoshka_weights=self.matryoshka.weights,
                           matryoshka_renormalize=self.matryoshka.renormalize)
        if self.world_size > 1:
            from .distributed import distributed_clip_loss

            loss = distributed_clip_loss(
                image_features, text_features, logit_scale, logit_bias,
                rank=self.rank, world_size=self.world_size, local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad, distributed=self.distributed, group=self.group,
                **options)
        else:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias, **options)
        return {"contrastive_loss": loss} if output_dict else loss
