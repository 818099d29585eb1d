"""The autograd.Function behind ``siglip_loss`` and ``FastSigLipLoss`` (one block).

forward:  backend.siglip_block -> loss_sum, and (when a gradient is wanted) d_img, d_txt,
          d_scale, d_bias from the SAME sweep over the tiles of S.
          loss = loss_sum / N
backward: the saved gradients times grad_loss / N, cast to each input's dtype.
Saved for backward: d_img and d_txt (float32, O(N*D), the size of the inputs) and two
scalars; nothing N x N.

Why the gradients are computed in the forward and saved, not recomputed in the backward:
the sigmoid loss has no normaliser, so G_ij = -z_ij sigmoid(-z_ij S_ij) is known the
moment S_ij is; a tile of S can be turned into its loss terms and its gradient
contributions at once.  Recomputing in the backward would redo the S GEMM (2 N^2 D of the
6 N^2 D flops, a third more work) to save O(N*D) memory that the inputs already cost.
When no input needs a gradient (evaluation, ``torch.no_grad``) the forward skips the two
gradient GEMMs.  The price: the gradients are formed before the upstream gradient is
known, so they are scaled by it afterwards (exact for the scalar loss).  A double
backward raises, as for every clip_fast loss: the gradient is a fused sweep with no
derivative of its own.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import backends as siglip_backends
from ..core.autograd import fresh_output, fused_backward, refuse_vmap
from ..core.matryoshka import NestedOptions
from ..core.registry import chunk_kwargs
from .backends.nested_torch import nested_siglip_block


def block_sweep(backend: str, chunk_size: Optional[int], nested: Optional[NestedOptions]) -> Callable:
    """The contract's ``siglip_block(img, txt, scale, bias, ids_row, ids_col, diag_positive,
    need_grad)`` of a resolved backend, or, with Matryoshka sizes, its nested sweep (the
    weighted sum over the sizes: ``backends.nested_torch`` or the Triton kernel)."""
    if nested is not None and backend == "triton":
        return functools.partial(siglip_backends.get_loaded(backend).nested_siglip_block, nested=nested)
    if nested is not None:
        return functools.partial(nested_siglip_block, nested=nested, chunk_size=chunk_size)
    return functools.partial(siglip_backends.get_loaded(backend).siglip_block, **chunk_kwargs(backend, chunk_size))


@dataclass(frozen=True)
class SigLipOptions:
    """Non-tensor options, passed to the Function as one hashable value."""
    backend: str                 # a resolved backend name: "torch", "triton" or "cuda"
    need_grad: bool              # whether the forward computes the gradients
    diag_positive: bool = True   # z_ii = +1 (the local block); False: negatives only
    chunk_size: Optional[int] = None  # rows per strip, torch backend only
    loss_dtype: Optional[torch.dtype] = None  # default: the features' dtype
    n_norm: Optional[int] = None  # the loss's divisor (default: the block's row count)
    nested: Optional[NestedOptions] = None  # Matryoshka sizes (torch backend), or None

    def block(self) -> Callable:
        return block_sweep(self.backend, self.chunk_size, self.nested)


class SigLipLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor], ids_row: Optional[torch.Tensor],
                ids_col: Optional[torch.Tensor], opts: SigLipOptions):
        loss_sum, d_img, d_txt, d_scale, d_bias = opts.block()(
            img, txt, scale, bias, ids_row, ids_col, opts.diag_positive, opts.need_grad)
        n = opts.n_norm or img.shape[0]
        loss = fresh_output(loss_sum / n, opts.loss_dtype or img.dtype)
        return loss, d_img, d_txt, d_scale, d_bias

    @staticmethod
    def setup_context(ctx, inputs, output):
        img, txt, scale, bias, _ids_row, _ids_col, opts = inputs
        _, d_img, d_txt, d_scale, d_bias = output
        ctx.save_for_backward(d_img, d_txt, d_scale, d_bias)
        ctx.opts = opts
        ctx.n = opts.n_norm or img.shape[0]
        ctx.meta = [(t.dtype, t.shape) if t is not None else None for t in (img, txt, scale, bias)]
        ctx.mark_non_differentiable(d_img, d_txt, d_scale, d_bias)

    @staticmethod
    def _grads(ctx, grad_loss: torch.Tensor):
        d_img, d_txt, d_scale, d_bias = ctx.saved_tensors
        if not ctx.opts.need_grad:
            raise RuntimeError(
                "clip_fast's SigLIP loss was computed without gradients (no input required grad "
                "or grad mode was off in the forward), so it cannot be backpropagated")
        needs = ctx.needs_input_grad
        (img_dt, _), (txt_dt, _), (scale_dt, scale_shape), bias_meta = ctx.meta
        g = grad_loss.to(torch.float64) / ctx.n
        gi = g.to(d_img.dtype)
        out_img = (d_img * gi).to(img_dt) if needs[0] else None
        out_txt = (d_txt * gi).to(txt_dt) if needs[1] else None
        out_scale = (d_scale * g).to(scale_dt).reshape(scale_shape) if needs[2] else None
        out_bias = None
        if bias_meta is not None and needs[3]:
            out_bias = (d_bias * g).to(bias_meta[0]).reshape(bias_meta[1])
        return out_img, out_txt, out_scale, out_bias, None, None, None

    backward = fused_backward("clip_fast's SigLIP loss", _grads.__func__)

    vmap = refuse_vmap("clip_fast's SigLIP loss", "call it once per batch element")
