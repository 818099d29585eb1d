"""SigLIP's sigmoid loss, in the same files as every clip_fast loss.

* ``module``      -- ``FastSigLipLoss``, open_clip's ``SigLipLoss`` constructor and call.
* ``functional``  -- ``siglip_loss``.
* ``function``    -- the autograd Function over one block (loss and gradients in one sweep).
* ``distributed`` -- open_clip's ``dist_impl`` exchanges across ranks.
* ``backends``    -- the one-sweep contract and numerics, and its ``torch``, ``triton``
  and ``cuda`` implementations.
"""
from .functional import siglip_loss
from .module import FastSigLipLoss

__all__ = ["FastSigLipLoss", "siglip_loss"]
