"""``FastDistillClipLoss``: open_clip's ``DistillClipLoss`` without the N x N logits.

open_clip's distillation term, for student logits S and teacher logits T (both N x N,
``logits_per_text`` their transposes), is

    distill = (mean_i KL_row_i + mean_j KL_col_j) / 2,
    KL_row_i = -sum_j softmax(T_i.)_j log_softmax(S_i.)_j = lse_S(i) - sum_j PT_ij S_ij

and the same over columns.  Here, per block of S and T:

forward   ``lse_forward`` (the CLIP backend contract) on the student and on the teacher:
          the four float64 log-sum-exps, O(N) each.
          one sweep (``distill_forward``) for the cross terms
          ``sum_j PT_ij (lse_S(i) - S_ij)``, rows and columns together.
backward  one sweep (``distill_backward``) recomputes each tile of S and T once and gives
          the student's and, when it needs them, the teacher's gradients.
Nothing N x N is kept; the Function saves the inputs and six O(N) float64 vectors.
The contrastive part is ``clip_fast``'s CLIP loss (``FastClipLoss``), unchanged.

Distributed (gather mode, open_clip's semantics): the features are gathered exactly as
open_clip's ``gather_features`` gathers them (with or without grad, the own shard put
back when not ``local_loss``), so autograd routes every gradient as open_clip's does.
Without ``local_loss`` every rank computes the global term on one (N, N) block; with it,
rank r's image rows are the row direction of the block (img_r, all_txt) and its text
rows the column direction of the block (all_img, txt_r).

Backends: "torch" (``clip_fast.backends.torch_distill``, any device) and "triton"
(``clip_fast.kernels.distill``, CUDA, or CPU under TRITON_INTERPRET=1).  There is no
CUDA-extension kernel for this loss: ``backend="cuda"`` raises and names the two that can.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from . import backends
from .core.autograd import apply_function, autocast_features, autocast_off, first_order_only, fresh_output
from .core.checks import ScalarLike, check_inputs
from .core.distributed import require_initialized
from .core.numerics import backend_scalar
from .core.registry import chunk_kwargs
from .loss import FastClipLoss

DISTILL_BACKENDS = ("torch", "triton")


def _distill_impl(name: str):
    if name == "torch":
        from .backends import torch_distill
        return torch_distill
    from .kernels import distill
    return distill


def resolve_distill_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend name the distillation term runs on ("torch" or "triton").

    "auto" (or ``CLIP_FAST_BACKEND``) takes Triton for CUDA tensors where it can run and the
    torch backend otherwise; a backend named explicitly raises when it cannot run.
    """
    if name == "auto":
        forced = os.environ.get("CLIP_FAST_BACKEND", "").strip().lower()
        if forced and forced != "auto":
            name = forced
        else:
            if device.type == "cuda" and backends.unavailable_reason("triton", device, dtype) is None:
                return "triton"
            return "torch"
    if name == "cuda":
        raise RuntimeError(
            "clip_fast's distillation loss has no CUDA-extension (backend='cuda') kernel; use "
            "backend='triton' (CUDA tensors) or backend='torch' (any device), or backend='auto'")
    if name not in DISTILL_BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + DISTILL_BACKENDS}, got {name!r}")
    reason = backends.unavailable_reason(name, device, dtype)
    if reason is not None:
        raise RuntimeError(f"clip_fast backend={name!r} cannot run on device={device} with dtype={dtype}: "
                           f"{reason}")
    return name


@dataclass(frozen=True)
class DistillOptions:
    """Non-tensor options of one block: which directions it carries and how they are averaged."""
    backend: str  # "torch" or "triton", resolved
    rows: bool  # the block's rows are loss rows (logits_per_image)
    cols: bool  # the block's columns are loss rows (logits_per_text)
    chunk_size: Optional[int] = None
    loss_dtype: Optional[torch.dtype] = None

    def kwargs(self) -> dict:
        return chunk_kwargs(self.backend, self.chunk_size)


class DistillBlockFunction(torch.autograd.Function):
    """Half the mean row term (``opts.rows``) plus half the mean column term (``opts.cols``)."""

    @staticmethod
    def forward(ctx, img, txt, scale, timg, ttxt, tscale, opts: DistillOptions):
        lse_impl = backends.get_loaded(opts.backend)
        impl = _distill_impl(opts.backend)
        kw = opts.kwargs()
        s, t = backend_scalar(scale, img), backend_scalar(tscale, img)
        img, txt, timg, ttxt = (x.contiguous() for x in (img, txt, timg, ttxt))
        # 1. The float64 log-sum-exps of both models (the CLIP forward sweep).
        lse_row, lse_col, _ = lse_impl.lse_forward(img, txt, s, None, **kw)
        tlse_row, tlse_col, _ = lse_impl.lse_forward(timg, ttxt, t, None, **kw)
        if not opts.rows:
            lse_row = tlse_row = None
        if not opts.cols:
            lse_col = tlse_col = None
        # 2. One sweep for the cross terms.
        row_term, col_term = impl.distill_forward(img, txt, s, timg, ttxt, t, lse_row, lse_col,
                                                  tlse_row, tlse_col, **kw)
        loss = torch.zeros((), dtype=torch.float64, device=img.device)
        if opts.rows:
            loss = loss + row_term.mean() / 2
        if opts.cols:
            loss = loss + col_term.mean() / 2
        ctx.save_for_backward(img, txt, scale, timg, ttxt, tscale, lse_row, lse_col, tlse_row, tlse_col,
                              row_term, col_term)
        ctx.opts = opts
        return fresh_output(loss, opts.loss_dtype or img.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss):
        (img, txt, scale, timg, ttxt, tscale, lse_row, lse_col, tlse_row, tlse_col,
         row_term, col_term) = ctx.saved_tensors
        opts: DistillOptions = ctx.opts
        needs = ctx.needs_input_grad
        teacher = any(needs[3:6])
        with torch.no_grad():
            impl = _distill_impl(opts.backend)
            coef_row = 1.0 / (2 * img.shape[0]) if opts.rows else 0.0
            coef_col = 1.0 / (2 * txt.shape[0]) if opts.cols else 0.0
            d_img, d_txt, d_s, d_timg, d_ttxt, d_t = impl.distill_backward(
                img, txt, backend_scalar(scale, img), timg, ttxt, backend_scalar(tscale, img), lse_row,
                lse_col, tlse_row, tlse_col, row_term, col_term, coef_row, coef_col, teacher, **opts.kwargs())
            g = grad_loss.detach().to(d_img.dtype)

            def out(d, like, need):
                if not need or d is None:
                    return None
                return (d * g).to(like.dtype).reshape(like.shape)

            grads = (out(d_img, img, needs[0]), out(d_txt, txt, needs[1]), out(d_s, scale, needs[2]),
                     out(d_timg, timg, needs[3]), out(d_ttxt, ttxt, needs[4]), out(d_t, tscale, needs[5]),
                     None)
        return first_order_only("clip_fast's distillation loss", grads)


def _block(img, txt, scale, timg, ttxt, tscale, opts: DistillOptions) -> torch.Tensor:
    return apply_function(DistillBlockFunction, opts.loss_dtype, img, txt, scale, timg, ttxt, tscale, opts)


def _prepare(image_features, text_features, logit_scale, dist_image_features, dist_text_features,
             dist_logit_scale, backend):
    scale, _ = check_inputs(image_features, text_features, logit_scale)
    tscale, _ = check_inputs(dist_image_features, dist_text_features, dist_logit_scale)
    if dist_image_features.shape[0] != image_features.shape[0]:
        raise ValueError(
            "dist_image_features and image_features must have the same batch size N (the teacher sees "
            f"the student's batch), got {tuple(dist_image_features.shape)} and {tuple(image_features.shape)}")
    if dist_image_features.device != image_features.device:
        raise ValueError(f"dist_image_features is on {dist_image_features.device} but image_features is on "
                         f"{image_features.device}; move both to the same device")
    img, txt, loss_dtype = autocast_features(image_features, text_features)
    timg, ttxt, _ = autocast_features(dist_image_features, dist_text_features)
    if timg.dtype != img.dtype:
        # The teacher may have its own precision; the sweep reads one dtype.
        timg, ttxt = timg.to(img.dtype), ttxt.to(img.dtype)
    name = resolve_distill_backend(backend, img.device, img.dtype)
    backends.preload(name)
    return img, txt, scale, timg, ttxt, tscale, loss_dtype, name


def distill_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: ScalarLike,
                 dist_image_features: torch.Tensor, dist_text_features: torch.Tensor,
                 dist_logit_scale: ScalarLike, *, backend: str = "auto",
                 chunk_size: Optional[int] = None) -> torch.Tensor:
    """open_clip's distillation term (single process), without the N x N logits.

    ``(mean_i CE(softmax(T_i.), S_i.) + mean_j CE(softmax(T_.j), S_.j)) / 2`` with
    ``S = logit_scale * image_features @ text_features.T`` (the student) and
    ``T = dist_logit_scale * dist_image_features @ dist_text_features.T`` (the teacher), as
    ``DistillClipLoss.dist_loss`` computes it.  Both models' features get gradients where
    they require them.  ``backend``: "auto", "torch" or "triton".
    """
    img, txt, scale, timg, ttxt, tscale, loss_dtype, name = _prepare(
        image_features, text_features, logit_scale, dist_image_features, dist_text_features,
        dist_logit_scale, backend)
    opts = DistillOptions(backend=name, rows=True, cols=True, chunk_size=chunk_size, loss_dtype=loss_dtype)
    return _block(img, txt, scale, timg, ttxt, tscale, opts)


def gather_like_open_clip(x: torch.Tensor, *, local_loss: bool, gather_with_grad: bool, rank: int,
                          world_size: int, group=None) -> torch.Tensor:
    """All ranks' ``x`` concatenated as open_clip's ``gather_features`` builds it.

    With grad (``torch.distributed.nn.all_gather``) when ``gather_with_grad``; else
    constant copies, with this rank's own ``x`` (and its gradient) put back unless
    ``local_loss``.  Shards must have equal sizes, as open_clip's gather requires.
    """
    if gather_with_grad:
        from torch.distributed.nn import all_gather  # the autograd-aware collective

        return torch.cat(all_gather(x, group=group) if group is not None else all_gather(x), dim=0)
    parts = [torch.zeros_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    if not local_loss:
        parts[rank] = x
    return torch.cat(parts, dim=0)


def distributed_distill_loss(image_features, text_features, logit_scale, dist_image_features,
                             dist_text_features, dist_logit_scale, *, rank: int, world_size: int,
                             local_loss: bool = False, gather_with_grad: bool = False,
                             backend: str = "auto", chunk_size: Optional[int] = None, group=None):
    """The distillation term of open_clip's ``DistillClipLoss`` with ``world_size > 1`` (gather mode).

    Every rank must call it (and its backward) collectively, with equal shard sizes.
    """
    require_initialized(world_size)
    img, txt, scale, timg, ttxt, tscale, loss_dtype, name = _prepare(
        image_features, text_features, logit_scale, dist_image_features, dist_text_features,
        dist_logit_scale, backend)
    sizes = [None] * world_size
    dist.all_gather_object(sizes, int(img.shape[0]), group=group)
    if len(set(sizes)) > 1:
        raise ValueError(f"clip_fast distillation loss: the shards' batch sizes differ across ranks ({sizes}); "
                         "open_clip's gather (and so this loss) needs equal shards")
    kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size,
              group=group)
    all_img, all_txt = gather_like_open_clip(img, **kw), gather_like_open_clip(txt, **kw)
    all_timg, all_ttxt = gather_like_open_clip(timg, **kw), gather_like_open_clip(ttxt, **kw)

    def opts(rows, cols):
        return DistillOptions(backend=name, rows=rows, cols=cols, chunk_size=chunk_size, loss_dtype=loss_dtype)

    if not local_loss:
        return _block(all_img, all_txt, scale, all_timg, all_ttxt, tscale, opts(True, True))
    # logits_per_image = img_r @ all_txt.T: rows of the block (img_r, all_txt);
    # logits_per_text = txt_r @ all_img.T: columns of the block (all_img, txt_r).
    return (_block(img, all_txt, scale, timg, all_ttxt, tscale, opts(True, False))
            + _block(all_img, txt, scale, all_timg, ttxt, tscale, opts(False, True)))


class FastDistillClipLoss(FastClipLoss):
    """open_clip's ``DistillClipLoss`` (constructor and call), fused.

    ``forward(image_features, text_features, logit_scale, dist_image_features,
    dist_text_features, dist_logit_scale, output_dict=False)`` returns
    ``(contrastive_loss, distill_loss)``, or ``{"contrastive_loss": ..., "distill_loss": ...}``.
    The contrastive part is ``FastClipLoss``'s; the distillation term is computed by
    :func:`distill_loss` (or :func:`distributed_distill_loss` when ``world_size > 1``,
    open_clip's gather semantics; ``distributed="ring"`` is refused).  ``backend``:
    "auto", "torch" or "triton" ("cuda" raises: there is no CUDA-extension kernel for
    the distillation term).  Other arguments as ``FastClipLoss``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: str = "auto",
                 chunk_size: Optional[int] = None, distributed: str = "gather", group=None):
        if backend == "cuda":
            resolve_distill_backend("cuda", torch.device("cuda"), torch.float32)  # raises, naming the others
        if distributed != "gather":
            raise ValueError(f"FastDistillClipLoss supports distributed='gather' only, got {distributed!r}")
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad,
                         cache_labels=cache_labels, rank=rank, world_size=world_size,
                         use_horovod=use_horovod, backend=backend, chunk_size=chunk_size,
                         distributed=distributed, group=group)

    def forward(self, image_features, text_features, logit_scale, dist_image_features,
                dist_text_features, dist_logit_scale, output_dict: bool = False):
        contrastive = super().forward(image_features, text_features, logit_scale)
        if self.world_size > 1:
            distill = distributed_distill_loss(
                image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale, rank=self.rank, world_size=self.world_size, local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad, backend=self.backend, chunk_size=self.chunk_size,
                group=self.group)
        else:
            distill = distill_loss(image_features, text_features, logit_scale, dist_image_features,
                                   dist_text_features, dist_logit_scale, backend=self.backend,
                                   chunk_size=self.chunk_size)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill
