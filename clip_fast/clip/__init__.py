"""The CLIP contrastive loss, in the same files as every clip_fast loss.

* ``module``      -- ``FastClipLoss``, open_clip's ``ClipLoss`` constructor and call.
* ``functional``  -- ``clip_loss`` and the per-call rules (``prepare_call``).
* ``function``    -- the autograd Function over one square block.
* ``targets``     -- positive groups, label smoothing, direction weights, hard negatives.
* ``coca``        -- ``FastCoCaLoss``: this loss plus CoCa's caption cross-entropy.
* ``distributed`` -- the gather and ring modes across ranks.
* ``backends``    -- the two-sweep contract, and its ``torch``, ``triton`` and ``cuda``
  implementations.
"""
from .functional import clip_loss
from .module import FastClipLoss

__all__ = ["FastClipLoss", "clip_loss"]
