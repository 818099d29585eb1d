"""clip_fast: the CLIP contrastive loss without the N x N logits matrix.

    loss = clip_fast.FastClipLoss()(image_features, text_features, logit_scale)
    loss = clip_fast.clip_loss(image_features, text_features, logit_scale, backend="auto")
"""
from .backends import available_backends
from .functional import clip_loss
from .loss import FastClipLoss

__version__ = "0.1.0"
__all__ = ["FastClipLoss", "clip_loss", "available_backends", "__version__"]

# open_clip's other contrastive losses, fused twins (see clip_fast.coca, clip_fast.distill).
from .coca import FastCoCaLoss  # noqa: E402
from .distill import FastDistillClipLoss  # noqa: E402

__all__ += ["FastCoCaLoss", "FastDistillClipLoss"]
