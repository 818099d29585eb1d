"""clip_fast: the CLIP contrastive loss without the N x N logits matrix.

    loss = clip_fast.FastClipLoss()(image_features, text_features, logit_scale)
    loss = clip_fast.clip_loss(image_features, text_features, logit_scale, backend="auto")
    loss = clip_fast.FastSigLipLoss()(image_features, text_features, logit_scale, logit_bias)
    loss = clip_fast.siglip_loss(image_features, text_features, logit_scale, logit_bias)
"""
from .clip import FastClipLoss, clip_loss
from .clip.backends import available_backends
from .siglip import FastSigLipLoss, siglip_loss

__version__ = "0.1.0"
__all__ = ["FastClipLoss", "clip_loss", "available_backends", "__version__"]

# open_clip's other contrastive losses, fused twins (see clip_fast.clip.coca, clip_fast.distill).
from .clip.coca import FastCoCaLoss  # noqa: E402
from .distill import FastDistillClipLoss  # noqa: E402

__all__ += ["FastCoCaLoss", "FastDistillClipLoss"]

# SigLIP's sigmoid loss (see clip_fast.siglip).
__all__ += ["FastSigLipLoss", "siglip_loss"]
