"""Functional form of the CLIP loss, mirroring ``torch.nn.functional``, and the per-call
rules every entry point applies (``prepare_call``)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from . import backends
from ..core.checks import (ScalarLike, check_chunk_size, check_direction_weight, check_group_ids,
                          check_inputs, check_label_smoothing, check_negatives)
from .function import ClipLossFunction, LossOptions
from ..core.autograd import apply_function, autocast_features


@dataclass(frozen=True)
class Call:
    """One call's inputs after the per-call rules: what an autograd Function is applied to."""
    img: torch.Tensor
    txt: torch.Tensor
    scale: torch.Tensor            # the caller's tensor (or a new 0-d one for a number)
    bias: Optional[torch.Tensor]
    opts: LossOptions
    ids: Optional[torch.Tensor] = None       # group_ids as int64
    neg_txt: Optional[torch.Tensor] = None   # hard-negative text features (cast as the features)
    neg_img: Optional[torch.Tensor] = None   # hard-negative image features


def prepare_call(image_features, text_features, logit_scale, logit_bias, backend: str,
                 chunk_size, *, group_ids=None, label_smoothing=0.0, image_to_text_weight=0.5,
                 negative_text_features=None, negative_image_features=None) -> Call:
    """Every per-call rule, in one place, for the single-process and distributed losses:
    input checks, ``logit_scale``/``logit_bias`` to tensors, the chunk-size check, the
    target options (``clip_fast.clip.targets``), autocast's cast policy, one tensor for both
    towers, and the backend choice."""
    scale, bias = check_inputs(image_features, text_features, logit_scale, logit_bias)
    chunk_size = check_chunk_size(chunk_size)
    ids = check_group_ids(group_ids, image_features)
    label_smoothing = check_label_smoothing(label_smoothing)
    image_to_text_weight = check_direction_weight(image_to_text_weight)
    neg_txt = check_negatives(negative_text_features, image_features, "negative_text_features")
    neg_img = check_negatives(negative_image_features, image_features, "negative_image_features")
    img, txt, loss_dtype = autocast_features(image_features, text_features)
    if loss_dtype is not None:  # negatives join the same matmuls: the same cast
        neg_txt = None if neg_txt is None else neg_txt.to(img.dtype)
        neg_img = None if neg_img is None else neg_img.to(img.dtype)
    if txt is img:
        # One tensor for both towers (a self-similarity loss): a view gives the Function two
        # distinct inputs, which torch.compile requires; both gradients reach the tensor.
        txt = txt.view_as(txt)
    impl = backends.resolve_backend(backend, img.device, img.dtype)
    return Call(img, txt, scale, bias, LossOptions(backend=impl.NAME, chunk_size=chunk_size,
                                                   loss_dtype=loss_dtype, label_smoothing=label_smoothing,
                                                   image_to_text_weight=image_to_text_weight),
                ids=ids, neg_txt=neg_txt, neg_img=neg_img)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: ScalarLike,
              logit_bias: Optional[ScalarLike] = None, *, group_ids: Optional[torch.Tensor] = None,
              label_smoothing: float = 0.0, image_to_text_weight: float = 0.5,
              negative_text_features: Optional[torch.Tensor] = None,
              negative_image_features: Optional[torch.Tensor] = None, backend: str = "auto",
              chunk_size: Optional[int] = None, matryoshka_dims: Optional[Sequence[int]] = None,
              matryoshka_weights: Optional[Sequence[float]] = None,
              matryoshka_renormalize: bool = True) -> torch.Tensor:
    """Symmetric CLIP contrastive loss, without materialising the N x N logits.

    ``S = logit_scale * image_features @ text_features.T + logit_bias`` and the loss is
    ``(mean_i CE(S[i, :], i) + mean_j CE(S[:, j], j)) / 2``, exactly open_clip's ``ClipLoss``
    with the default options; the options below generalise the targets (derivation in
    ``clip_fast.clip.targets``) at O(N * D) extra cost, plus the hard negatives' blocks.

    Args:
        image_features, text_features: (N, D) embeddings (normalised or not) of the same
            floating dtype and device; row i of one is paired with row i of the other.
        logit_scale: the multiplier, already exponentiated (open_clip passes
            ``model.logit_scale.exp()``): a float or a 0-d / 1-element tensor.
        logit_bias: optional additive bias (SigLIP-style models). It shifts every logit
            equally, so its gradient is exactly 0 for this loss; it is accepted so a
            model that has one can use the same call.
        group_ids: optional (N,) integer tensor.  Pairs (i, j) with equal ids are positives
            of each other in both directions (two captions of one image, one class name
            twice); each row's target is uniform over its positives (UniCL, SupCon).  All
            ids distinct is CLIP.
        label_smoothing: epsilon in [0, 1), as in ``torch.nn.CrossEntropyLoss``: the target
            is (1 - eps) * the positives' distribution + eps uniform over the softmax's
            classes (hard negatives included).  ALIGN uses 0.1.
        image_to_text_weight: lambda in [0, 1]; the loss is lambda * CE(image -> text)
            + (1 - lambda) * CE(text -> image) (ConVIRT).  0.5 is CLIP.
        negative_text_features, negative_image_features: optional (M, D) hard negatives of
            the features' dtype and device (any M >= 0): unpaired texts that join the
            columns of every image's softmax, and unpaired images that join the rows of
            every text's softmax (NegCLIP).  Their gradients flow back.
        backend: "auto", "torch", "triton" or "cuda". "auto" (or the environment
            variable ``CLIP_FAST_BACKEND``) picks the fastest available backend;
            a backend named explicitly raises if it cannot run.
        chunk_size: rows per strip for the torch backend (default: from a memory budget).
        matryoshka_dims: optional nested sizes, e.g. (64, 128, 256): the loss is then
            sum_k w_k * (this loss on the first d_k dimensions of both features), every
            size from one sweep over D (``clip_fast.clip.matryoshka``, docs/matryoshka.md).
            The torch and Triton backends run it ("auto" picks as for the plain loss);
            backend="cuda" raises.
        matryoshka_weights: the w_k (default: all 1, as sentence-transformers).
        matryoshka_renormalize: L2-normalise each prefix before its loss (default True,
            so each prefix is a unit embedding, as in sentence-transformers' cosine losses);
            False uses the raw prefixes.

    To call it inside ``torch.compile(fullgraph=True)``, import the backends first with
    ``clip_fast.backends.preload()`` (``FastClipLoss`` does this in its constructor).

    Returns:
        The scalar loss, in the features' dtype (float32 under autocast). Gradients flow
        to both features, ``logit_scale`` and ``logit_bias``.
    """
    if matryoshka_dims is not None:
        return _matryoshka(image_features, text_features, logit_scale, logit_bias, backend, chunk_size,
                           matryoshka_dims, matryoshka_weights, matryoshka_renormalize,
                           group_ids=group_ids, label_smoothing=label_smoothing,
                           image_to_text_weight=image_to_text_weight,
                           negative_text_features=negative_text_features,
                           negative_image_features=negative_image_features)
    call = prepare_call(image_features, text_features, logit_scale, logit_bias, backend, chunk_size,
                        group_ids=group_ids, label_smoothing=label_smoothing,
                        image_to_text_weight=image_to_text_weight,
                        negative_text_features=negative_text_features,
                        negative_image_features=negative_image_features)
    return apply_function(ClipLossFunction, call.opts.loss_dtype, call.img, call.txt, call.scale, call.bias,
                          call.ids, call.neg_txt, call.neg_img, call.opts)[0]


def _matryoshka(image_features, text_features, logit_scale, logit_bias, backend, chunk_size, dims, weights,
                renormalize, **options) -> torch.Tensor:
    """``clip_loss`` with ``matryoshka_dims``: the nested sweep (``matryoshka.nested_backend``
    picks the backend)."""
    from . import matryoshka

    check_inputs(image_features, text_features, logit_scale, logit_bias)
    nested = matryoshka.check_matryoshka(dims, weights, renormalize, image_features.shape[1])
    call = prepare_call(image_features, text_features, logit_scale, logit_bias, "torch", chunk_size, **options)
    call = replace(call, opts=replace(call.opts, backend=matryoshka.nested_backend(backend, call.img.device,
                                                                                 call.img.dtype)))
    return matryoshka.nested_clip_loss(call, nested)
