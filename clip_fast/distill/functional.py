"""``distill_loss``: open_clip's distillation term on one process, and the per-call rules
(``prepare``) the distributed term shares."""
from __future__ import annotations

from typing import Optional

import torch

from ..clip import backends as clip_backends
from ..core.autograd import autocast_features
from ..core.checks import ScalarLike, check_inputs
from . import backends as distill_backends
from .function import DistillOptions, block


def prepare(image_features, text_features, logit_scale, dist_image_features, dist_text_features,
             dist_logit_scale, backend):
    scale, _ = check_inputs(image_features, text_features, logit_scale)
    tscale, _ = check_inputs(dist_image_features, dist_text_features, dist_logit_scale)
    if dist_image_features.shape[0] != image_features.shape[0]:
        raise ValueError(
            "dist_image_features and image_features must have the same batch size N (the teacher sees "
            f"the student's batch), got {tuple(dist_image_features.shape)} and {tuple(image_features.shape)}")
    if dist_image_features.device != image_features.device:
        raise ValueError(f"dist_image_features is on {dist_image_features.device} but image_features is on "
                         f"{image_features.device}; move both to the same device")
    img, txt, loss_dtype = autocast_features(image_features, text_features)
    timg, ttxt, _ = autocast_features(dist_image_features, dist_text_features)
    if timg.dtype != img.dtype:
        # The teacher may have its own precision; the sweep reads one dtype.
        timg, ttxt = timg.to(img.dtype), ttxt.to(img.dtype)
        tscale = tscale.to(scale.dtype)  # and its scale to the student's compute dtype
    name = distill_backends.resolve_backend(backend, img.device, img.dtype)
    clip_backends.preload(name)  # the log-sum-exps come from the CLIP backend of that name
    return img, txt, scale, timg, ttxt, tscale, loss_dtype, name


def distill_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: ScalarLike,
                 dist_image_features: torch.Tensor, dist_text_features: torch.Tensor,
                 dist_logit_scale: ScalarLike, *, backend: str = "auto",
                 chunk_size: Optional[int] = None) -> torch.Tensor:
    """open_clip's distillation term (single process), without the N x N logits.

    ``(mean_i CE(softmax(T_i.), S_i.) + mean_j CE(softmax(T_.j), S_.j)) / 2`` with
    ``S = logit_scale * image_features @ text_features.T`` (the student) and
    ``T = dist_logit_scale * dist_image_features @ dist_text_features.T`` (the teacher), as
    ``DistillClipLoss.dist_loss`` computes it.  Both models' features get gradients where
    they require them.  ``backend``: "auto", "torch" or "triton".
    """
    img, txt, scale, timg, ttxt, tscale, loss_dtype, name = prepare(
        image_features, text_features, logit_scale, dist_image_features, dist_text_features,
        dist_logit_scale, backend)
    opts = DistillOptions(backend=name, rows=True, cols=True, chunk_size=chunk_size, loss_dtype=loss_dtype)
    return block(img, txt, scale, timg, ttxt, tscale, opts)
