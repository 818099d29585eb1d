"""Functional form of the CLIP loss, mirroring ``torch.nn.functional``, and the per-call
rules every entry point applies (``prepare_call``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import backends
from ._validation import ScalarLike, check_chunk_size, check_inputs
from .autograd import ClipLossFunction, LossOptions


@dataclass(frozen=True)
class Call:
    """One call's inputs after the per-call rules: what an autograd Function is applied to."""
    img: torch.Tensor
    txt: torch.Tensor
    scale: torch.Tensor            # the caller's tensor (or a new 0-d one for a number)
    bias: Optional[torch.Tensor]
    opts: LossOptions


def prepare_call(image_features, text_features, logit_scale, logit_bias, backend: str,
                 chunk_size) -> Call:
    """Every per-call rule, in one place, for the single-process and distributed losses:
    input checks, ``logit_scale``/``logit_bias`` to tensors, the chunk-size check,
    autocast's cast policy, one tensor for both towers, and the backend choice."""
    scale, bias = check_inputs(image_features, text_features, logit_scale, logit_bias)
    chunk_size = check_chunk_size(chunk_size)
    img, txt, loss_dtype = autocast_features(image_features, text_features)
    if txt is img:
        # One tensor for both towers (a self-similarity loss): a view gives the Function two
        # distinct inputs, which torch.compile requires; both gradients reach the tensor.
        txt = txt.view_as(txt)
    impl = backends.resolve_backend(backend, img.device, img.dtype)
    return Call(img, txt, scale, bias, LossOptions(backend=impl.NAME, chunk_size=chunk_size,
                                                   loss_dtype=loss_dtype))


def apply_loss(fn, call: Call, *extra):
    """``fn.apply`` on a prepared call, with autocast off inside when it cast the features
    (the loss is formed in float32 from the already-cast features)."""
    args = (call.img, call.txt, call.scale, call.bias, *extra)
    if call.opts.loss_dtype is None:
        return fn.apply(*args)
    with torch.autocast(call.img.device.type, enabled=False):
        return fn.apply(*args)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: ScalarLike,
              logit_bias: Optional[ScalarLike] = None, *, backend: str = "auto",
              chunk_size: Optional[int] = None) -> torch.Tensor:
    """Symmetric CLIP contrastive loss, without materialising the N x N logits.

    ``S = logit_scale * image_features @ text_features.T + logit_bias`` and the loss is
    ``(mean_i CE(S[i, :], i) + mean_j CE(S[:, j], j)) / 2``, exactly open_clip's ``ClipLoss``.

    Args:
        image_features, text_features: (N, D) embeddings (normalised or not) of the same
            floating dtype and device; row i of one is paired with row i of the other.
        logit_scale: the multiplier, already exponentiated (open_clip passes
            ``model.logit_scale.exp()``): a float or a 0-d / 1-element tensor.
        logit_bias: optional additive bias (SigLIP-style models). It shifts every logit
            equally, so its gradient is exactly 0 for this loss; it is accepted so a
            model that has one can use the same call.
        backend: "auto", "torch", "triton" or "cuda". "auto" (or the environment
            variable ``CLIP_FAST_BACKEND``) picks the fastest available backend;
            a backend named explicitly raises if it cannot run.
        chunk_size: rows per strip for the torch backend (default: from a memory budget).

    To call it inside ``torch.compile(fullgraph=True)``, import the backends first with
    ``clip_fast.backends.preload()`` (``FastClipLoss`` does this in its constructor).

    Returns:
        The scalar loss, in the features' dtype (float32 under autocast). Gradients flow
        to both features, ``logit_scale`` and ``logit_bias``.
    """
    call = prepare_call(image_features, text_features, logit_scale, logit_bias, backend, chunk_size)
    return apply_loss(ClipLossFunction, call, call.opts)[0]


def autocast_features(image_features: torch.Tensor, text_features: torch.Tensor):
    """Apply autocast's policy for a matmul to the features: ``(img, txt, loss_dtype)``.

    Under ``torch.autocast`` a matmul runs floating inputs other than float64 in the
    autocast dtype and leaves float64 alone; the loss the fused sweep returns is then
    float32, as autocast's softmax/cross-entropy would give.  ``loss_dtype`` is None
    when autocast is off (or leaves these features alone): the loss takes the features' dtype.
    """
    device_type = image_features.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...): never cast
        return image_features, text_features, None
    if not enabled or image_features.dtype == torch.float64:
        return image_features, text_features, None
    dtype = torch.get_autocast_dtype(device_type)
    return image_features.to(dtype), text_features.to(dtype), torch.float32
