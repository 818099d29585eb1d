"""The autograd.Function behind ``clip_loss`` and ``FastClipLoss`` (single process), and the
backward tail it shares with the distributed Functions.

forward:  backend.lse_forward  -> row/column log-sum-exp and the diagonal (float64, O(N))
          loss = (sum_i (lse_row_i - S_ii) + sum_i (lse_col_i - S_ii)) / (2N)
          formed from the per-pair terms, each >= 0 and accurate on its own, so a small
          loss is not the difference of two large sums.
backward: backend.grad_backward -> d_img, d_txt, d_scale from one recompute of each tile,
          with G = (P_row + P_col - 2I) / (2N) and G's diagonal taken from the forward's
          float64 terms (see ``clip_fast.backends.diag_grad``).
Saved for backward: the inputs and three O(N) float64 vectors, nothing N x N.

``logit_bias`` shifts every logit of every softmax equally and so cancels from the loss
exactly: it never enters the arithmetic (a bias of 1e3 would otherwise cost fp32 digits
of S), and its gradient is exactly 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import backends
from .backends import compute_dtype, compute_scalar
from ._autograd import autocast_off, first_order_only, fresh_output


@dataclass(frozen=True)
class LossOptions:
    """Non-tensor options, passed to the Function as one hashable value."""
    backend: str  # a resolved backend name: "torch", "triton" or "cuda"
    chunk_size: Optional[int] = None  # rows per strip, torch backend only
    loss_dtype: Optional[torch.dtype] = None  # default: the features' dtype (float32 under autocast)

    def kwargs(self) -> dict:
        if self.backend == "torch" and self.chunk_size is not None:
            return {"chunk_size": self.chunk_size}
        return {}


def finish_grads(d_img, d_txt, d_scale, grad_loss, img, txt, scale, bias_meta, needs) -> tuple:
    """The backward tail every loss Function shares.

    Multiplies the backend's float32/64 gradients by the upstream gradient ``grad_loss``
    (None: already applied), casts them to the inputs' dtypes and shapes, and gives a
    ``logit_bias`` (``bias_meta = (shape, dtype, device)``, or None) an exact zero
    gradient: every row and column of a softmax sums to one, so a shared bias cancels.
    Returns the Function's gradient tuple, None for the non-tensor options argument.
    """
    if grad_loss is not None:
        g = grad_loss.to(d_img.dtype)
        d_img, d_txt, d_scale = d_img * g, d_txt * g, d_scale * g
    d_bias = None
    if bias_meta is not None and needs[3]:
        shape, dtype, device = bias_meta
        d_bias = torch.zeros(shape, dtype=dtype, device=device)
    return (d_img.to(img.dtype) if needs[0] else None,
            d_txt.to(txt.dtype) if needs[1] else None,
            d_scale.to(scale.dtype).reshape(scale.shape) if needs[2] else None,
            d_bias, None)


def bias_meta(bias: Optional[torch.Tensor]):
    """What the backward needs of ``logit_bias`` to give it a zero gradient (no saved tensor)."""
    return None if bias is None else (bias.shape, bias.dtype, bias.device)


class ClipLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor], opts: LossOptions) -> torch.Tensor:
        impl = backends.get_loaded(opts.backend)
        s = compute_scalar(scale, compute_dtype(img.dtype))
        lse_row, lse_col, diag = impl.lse_forward(img, txt, s, None, **opts.kwargs())
        loss = ((lse_row - diag).sum() + (lse_col - diag).sum()) / (2.0 * img.shape[0])
        return fresh_output(loss, opts.loss_dtype or img.dtype), lse_row, lse_col, diag

    @staticmethod
    def setup_context(ctx, inputs, output):
        img, txt, scale, bias, opts = inputs
        _, lse_row, lse_col, diag = output
        ctx.save_for_backward(img, txt, scale, lse_row, lse_col, diag)
        ctx.opts = opts
        ctx.bias_meta = bias_meta(bias)
        ctx.mark_non_differentiable(lse_row, lse_col, diag)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss: torch.Tensor, *unused):
        with torch.no_grad():
            grads = ClipLossFunction._grads(ctx, grad_loss)
        return first_order_only("clip_fast's CLIP loss", grads)

    @staticmethod
    def _grads(ctx, grad_loss: torch.Tensor):
        img, txt, scale, lse_row, lse_col, diag = ctx.saved_tensors
        opts: LossOptions = ctx.opts
        impl = backends.get_loaded(opts.backend)
        c = 1.0 / (2 * img.shape[0])
        d_img, d_txt, d_scale = impl.grad_backward(
            img, txt, compute_scalar(scale, compute_dtype(img.dtype)), None, lse_row, lse_col,
            c, c, 2 * c, diag=diag, **opts.kwargs())
        return finish_grads(d_img, d_txt, d_scale, grad_loss, img, txt, scale, ctx.bias_meta,
                            ctx.needs_input_grad)

    @staticmethod
    def vmap(info, in_dims, *args):
        raise NotImplementedError(
            "clip_fast's CLIP loss does not support torch.func.vmap (a batch of losses); "
            "call it once per batch element, or stack the batches along N")
