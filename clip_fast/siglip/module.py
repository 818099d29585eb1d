"""``FastSigLipLoss``: a drop-in replacement for open_clip's ``SigLipLoss``."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from . import backends as siglip_backends
from ..core.checks import ScalarLike, aliased, check_chunk_size
from ..core.distributed import check_world_size
from ..core.matryoshka import check_matryoshka
from ..core.registry import BACKENDS
from .distributed import DIST_IMPLS
from .functional import nested_backend, siglip_loss


class FastSigLipLoss(nn.Module):
    """SigLIP's sigmoid loss with open_clip's ``SigLipLoss`` constructor and call.

    Nothing of size N x N is allocated: one tiled sweep gives the loss and every gradient.

    Args (open_clip 3.3.0):
        cache_labels: accepted for compatibility; clip_fast builds no label tensor.
        rank, world_size: this process's place, used when ``world_size > 1``
            (``torch.distributed`` must be initialised).
        dist_impl: "bidir" (default), "shift", "reduce" or "gather": open_clip's exchange
            of the other ranks' texts.  Every one gives the same loss and gradients; they
            differ in communication.  Per-rank memory is O(N_local * D) for all but
            "gather", which holds every rank's texts as open_clip's does.
    Older open_clip keywords:
        bidir: True means dist_impl="bidir", False means "shift" (open_clip < 2.24).
        use_horovod: not supported (raises NotImplementedError when True).
    clip_fast keywords:
        distributed: the same choice under the name every clip_fast loss takes
            (``FastClipLoss(distributed=...)``); ``dist_impl`` is open_clip's name for it.
        backend: "auto", "torch", "triton" or "cuda" (see ``clip_fast.available_backends``).
        chunk_size: rows per strip for the torch backend.
        group: the ``torch.distributed`` process group (default: the world).
        matryoshka_dims, matryoshka_weights, matryoshka_renormalize: the nested-size
            loss, as ``siglip_loss`` takes them (backend "auto"/"torch" or "triton", one
            process or distributed; docs/matryoshka.md).

    ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False,
    *, group_ids=None)`` returns the scalar loss, or ``{"contrastive_loss": loss}``.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, bidir: Optional[bool] = None,
                 use_horovod: bool = False, backend: str = "auto",
                 chunk_size: Optional[int] = None, group=None, distributed: Optional[str] = None,
                 matryoshka_dims: Optional[Sequence[int]] = None,
                 matryoshka_weights: Optional[Sequence[float]] = None, matryoshka_renormalize: bool = True):
        super().__init__()
        if use_horovod:
            raise NotImplementedError(
                "FastSigLipLoss(use_horovod=True) is not supported; use torch.distributed (torchrun) instead")
        if bidir is not None:
            implied = "bidir" if bidir else "shift"
            if dist_impl is not None and dist_impl != implied:
                raise ValueError(f"FastSigLipLoss got bidir={bidir} (meaning dist_impl={implied!r}) and "
                                 f"dist_impl={dist_impl!r}; pass only dist_impl")
            dist_impl = implied
        dist_impl = aliased("FastSigLipLoss", "distributed", distributed, "dist_impl", dist_impl, "bidir")
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS} or None, got {dist_impl!r}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        check_world_size(world_size, rank)
        self.cache_labels = bool(cache_labels)
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = self.distributed = dist_impl
        self.bidir = dist_impl == "bidir"
        self.use_horovod = False
        self.backend = backend
        siglip_backends.preload(backend)  # import now: torch.compile cannot trace an import
        self.chunk_size = check_chunk_size(chunk_size)
        self.group = group
        self.matryoshka = None
        if matryoshka_dims is not None:
            nested_backend(backend, "FastSigLipLoss")
            # The features' D is not known yet: each call checks the sizes against it.
            self.matryoshka = check_matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_renormalize, None)

    def extra_repr(self) -> str:
        text = f"backend={self.backend!r}, world_size={self.world_size}, dist_impl={self.dist_impl!r}"
        if self.matryoshka is not None:
            text += f", matryoshka_dims={self.matryoshka.dims}"
        return text

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: ScalarLike, logit_bias: Optional[ScalarLike] = None,
                output_dict: bool = False, *, group_ids: Optional[torch.Tensor] = None):
        options = dict(group_ids=group_ids, backend=self.backend, chunk_size=self.chunk_size)
        if self.matryoshka is not None:
            options.update(matryoshka_dims=self.matryoshka.dims, matryoshka_weights=self.matryoshka.weights,
                           matryoshka_renormalize=self.matryoshka.renormalize)
        if self.world_size > 1:
            from .distributed import distributed_siglip_loss

            loss = distributed_siglip_loss(
                image_features, text_features, logit_scale, logit_bias, rank=self.rank,
                world_size=self.world_size, dist_impl=self.dist_impl, group=self.group, **options)
        else:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, **options)
        return {"contrastive_loss": loss} if output_dict else loss
