"""Functional form of the SigLIP (sigmoid) loss, mirroring ``torch.nn.functional``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import backends as siglip_backends
from ..core.autograd import apply_function, autocast_features, needs_grad
from ..core.checks import ScalarLike, check_chunk_size, check_group_ids, check_inputs
from ..core.matryoshka import check_matryoshka
from .function import SigLipLossFunction, SigLipOptions


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: ScalarLike,
                logit_bias: Optional[ScalarLike] = None, *, group_ids: Optional[torch.Tensor] = None,
                backend: str = "auto", chunk_size: Optional[int] = None,
                matryoshka_dims: Optional[Sequence[int]] = None, matryoshka_weights: Optional[Sequence[float]] = None,
                matryoshka_renormalize: bool = True) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss, without materialising the N x N logits.

    ``S = logit_scale * image_features @ text_features.T + logit_bias`` and the loss is
    ``-sum_ij log sigmoid(z_ij S_ij) / N`` with z_ij = +1 for a positive pair (i == j)
    and -1 otherwise: exactly open_clip's ``SigLipLoss`` on one process.

    Args:
        image_features, text_features: (N, D) embeddings of the same floating dtype and
            device; row i of one is paired with row i of the other.
        logit_scale: the multiplier, already exponentiated (open_clip passes
            ``model.logit_scale.exp()``): a float or a 0-d / 1-element tensor.
        logit_bias: the additive bias (SigLIP initialises it at -10), or None.
        group_ids: optional (N,) integer tensor; pairs (i, j) with equal ids are positives
            (z_ij = +1) in both directions.  All ids distinct is the plain loss.
        backend: "auto", "torch", "triton" or "cuda", as for ``clip_loss``.
        chunk_size: rows per strip for the torch backend (default: from a memory budget).
        matryoshka_dims: optional nested sizes, e.g. (64, 128, 256): the loss is then
            ``sum_k w_k * siglip_loss(f(img[:, :d_k]), f(txt[:, :d_k]), ...)``, every size from
            one sweep over D (the torch sweep, or the Triton kernel with backend="triton";
            "cuda" raises; docs/matryoshka.md).
        matryoshka_weights: the w_k (default: all 1, as sentence-transformers).
        matryoshka_renormalize: f = L2-normalise each prefix before its loss (default True,
            each prefix a usable embedding on its own); False: the raw prefixes.

    To call it inside ``torch.compile(fullgraph=True)``, import the backends first with
    ``clip_fast.siglip.backends.preload()`` (``FastSigLipLoss`` does this in its constructor).

    Returns:
        The scalar loss, in the features' dtype (float32 under autocast).  Gradients flow
        to both features, ``logit_scale`` and ``logit_bias``.
    """
    call = prepare_call(image_features, text_features, logit_scale, logit_bias, group_ids, backend,
                        chunk_size, matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights,
                        matryoshka_renormalize=matryoshka_renormalize)
    return apply_function(SigLipLossFunction, call.opts.loss_dtype, call.img, call.txt, call.scale,
                          call.bias, call.ids, call.ids, call.opts)[0]


@dataclass(frozen=True)
class Call:
    """One call's inputs after the per-call rules: what an autograd Function is applied to."""
    img: torch.Tensor
    txt: torch.Tensor
    scale: torch.Tensor            # the backends' 0-d scalar (``clip_fast.core.checks``)
    bias: Optional[torch.Tensor]
    ids: Optional[torch.Tensor]    # group_ids as int64
    opts: SigLipOptions


def prepare_call(image_features, text_features, logit_scale, logit_bias, group_ids, backend: str,
                 chunk_size, *, matryoshka_dims=None, matryoshka_weights=None,
                 matryoshka_renormalize=True) -> Call:
    """Every per-call rule, in one place, for the single-process and distributed losses:
    input checks, the scalars, autocast's cast policy, one tensor for both towers, the
    backend choice, the Matryoshka sizes and whether the forward forms gradients."""
    scale, bias = check_inputs(image_features, text_features, logit_scale, logit_bias)
    ids = check_group_ids(group_ids, image_features)
    chunk_size = check_chunk_size(chunk_size)
    nested = None
    if matryoshka_dims is not None:
        nested = check_matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_renormalize,
                                  image_features.shape[1])
        backend = nested_backend(backend, "siglip_loss")
    img, txt, loss_dtype = autocast_features(image_features, text_features)
    if txt is img:  # a view: two distinct inputs for the Function (torch.compile needs them)
        txt = txt.view_as(txt)
    impl = siglip_backends.resolve_backend(backend, img.device, img.dtype)
    opts = SigLipOptions(backend=impl.NAME, need_grad=needs_grad(img, txt, scale, bias),
                         chunk_size=chunk_size, loss_dtype=loss_dtype, nested=nested)
    return Call(img, txt, scale, bias, ids, opts)


def nested_backend(backend: str, who: str) -> str:
    """The backend of a Matryoshka call: "auto" is the torch sweep (the Triton one has no GPU
    measurement yet), "triton" is taken when asked for by name, "cuda" raises."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"{who}(matryoshka_dims=...) runs on backend='torch' (or 'auto') or 'triton', got "
                         f"backend={backend!r}: the CUDA extension has no nested SigLIP sweep")
    return "torch" if backend == "auto" else backend
