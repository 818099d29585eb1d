"""The one autograd.Function behind ``clip_loss`` and ``FastClipLoss`` (single process).

forward:  backend.lse_forward  -> row/column log-sum-exp and the diagonal, O(N) each
          loss = (sum lse_row + sum lse_col - 2 * sum diag) / (2N)
backward: backend.grad_backward -> d_img, d_txt, d_scale from one recompute of each tile,
          with G = (P_row + P_col - 2I) / (2N).
Saved for backward: the inputs and the two O(N) log-sum-exp vectors, nothing N x N.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import backends
from ._autograd import autocast_off, fresh_output


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


def _as_f32_scalar(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t.detach().reshape(()).to(torch.float64 if dtype == torch.float64 else torch.float32)


class ClipLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor], opts: LossOptions) -> torch.Tensor:
        impl = backends.get_loaded(opts.backend)
        s = _as_f32_scalar(scale, img.dtype)
        b = _as_f32_scalar(bias, img.dtype)
        lse_row, lse_col, diag = impl.lse_forward(img, txt, s, b, **opts.kwargs())
        n = img.shape[0]
        loss = (lse_row.sum() + lse_col.sum() - 2.0 * diag.sum()) / (2.0 * n)
        ctx.save_for_backward(img, txt, scale, bias, lse_row, lse_col)
        ctx.opts = opts
        return fresh_output(loss, opts.loss_dtype or img.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss: torch.Tensor):
        img, txt, scale, bias, lse_row, lse_col = ctx.saved_tensors
        opts: LossOptions = ctx.opts
        impl = backends.get_loaded(opts.backend)
        n = img.shape[0]
        s = _as_f32_scalar(scale, img.dtype)
        b = _as_f32_scalar(bias, img.dtype)
        d_img, d_txt, d_scale = impl.grad_backward(
            img, txt, s, b, lse_row, lse_col, 1.0 / (2 * n), 1.0 / (2 * n), 1.0 / n, **opts.kwargs()
        )
        g = grad_loss.to(d_img.dtype)
        d_img = (d_img * g).to(img.dtype) if ctx.needs_input_grad[0] else None
        d_txt = (d_txt * g).to(txt.dtype) if ctx.needs_input_grad[1] else None
        d_scale = (d_scale * g).to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        # Every row of a softmax sums to one, so the loss does not depend on a shared bias.
        d_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[3] else None
        return d_img, d_txt, d_scale, d_bias, None
