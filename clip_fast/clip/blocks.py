"""A softmax cross-entropy whose candidates are several blocks of similarities: per anchor
row, one log-sum-exp over any union of (rows x candidates) blocks, each block a sweep of
the backend contract (``clip_fast.clip.backends``); nothing of size rows x candidates
is formed.

The loss
--------
Features ``X_0, X_1, ..`` (rows of each: any count).  A block ``b`` pairs anchor rows
``X_{x(b)}`` (n rows, the same n for every block) with candidates ``X_{y(b)}`` and gives
the logits

    L_ij = scale_b * <x_i, y_j>   (j != i),      L_ii = diag_scale_b * <x_i, y_i>

where the diagonal is the anchor's own candidate (the caller orders the candidates so;
a rotation of the candidate rows does it), may have its own softmax scale, or is masked
out (``diag_scale=None``: the entry is not a candidate at all).  Every entry's logit has
the derivative ``grad_scale_b`` with respect to ``<x_i, y_j>``: a logit offset that is a
function of the similarity but carries no gradient (``scale * sim + h * sim.detach()``)
is ``scale = s + h`` with ``grad_scale = s``.  Blocks are grouped into partitions p with
weights w_p; each partition holds exactly one block flagged ``positive``, whose diagonal
is the target.  With ``lse_p,i`` the log-sum-exp of row i over the union of partition p's
blocks and ``pos_p,i`` the positive block's diagonal logit,

    loss = (1 / n) sum_i sum_p w_p (lse_p,i - pos_p,i).

Each term ``lse - pos >= 0`` is formed on its own, so a confident row keeps its accuracy.

How a block is swept
--------------------
forward: ``lse_forward`` gives the block's row log-sum-exp with the diagonal kept out of
the sums and added back in float64.  A block whose diagonal has the block's scale uses it
as it is.  Otherwise the backend's ``lse_forward_offdiag`` gives the off-diagonal part,
and the diagonal is added back at its own scale (``diag * diag_scale / scale``) or not
at all: a masked self-similarity (queries x queries) is the same sweep whose diagonal is
never added.  A partition's log-sum-exp is the float64 ``logaddexp`` of its blocks'.

backward: ``dL / d<x_i, y_j> = grad_scale * (w_p P_ij - w_p [positive, i == j]) / n`` with
``P_ij = exp(L_ij - lse_p,i)``.  That is one ``grad_backward`` per block with
``coef_row = w_p * r / n``, r = grad_scale / scale (the kernel multiplies G by the sweep's
``scale``) and ``coef_col = 0``.  G's diagonal, by kind (``_kernel_diag``):
a positive block's from ``diag_grad`` with the true logit,
``coef_row * expm1(L_ii - lse) + coef_row - coef_diag`` with ``coef_diag = coef_row`` (the
target: exact on a confident row); a plain block's from the recomputed tile like any
entry (``expm1(x) + 1`` would lose a small P_ii); a masked one is 0 exactly (``L_ii = -inf``
in ``diag_grad``); one at its own scale is 0 in the sweep and ``w_p P_ii / n`` times
``grad_scale`` is added on the host, O(n * D).

A sweep with a differently scaled or masked diagonal needs ``lse_forward_offdiag``: the
torch and Triton backends have it; where the chosen backend does not (the CUDA
extension), ``"auto"`` takes Triton, then torch, and a backend named explicitly raises.
The scale is a number (no gradient), as in sentence-transformers' MNRL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from . import backends
from ..core.autograd import fresh_output, fused_backward, refuse_vmap
from ..core.checks import as_scalar_tensor
from ..core.numerics import combine_diag, compute_dtype
from ..core.registry import chunk_kwargs

__all__ = ["Block", "block_softmax_loss"]


@dataclass(frozen=True)
class Block:
    """One block of candidates: rows ``features[x]`` against ``features[y]`` (see the module doc)."""
    x: int
    y: int
    scale: float
    diag_scale: Optional[float]   # None: the diagonal entry is masked out
    grad_scale: float
    partition: int = 0
    positive: bool = False        # the diagonal is partition's target

    @property
    def plain(self) -> bool:
        """The diagonal has the block's own scale: ``lse_forward`` as it is."""
        return self.diag_scale is not None and self.diag_scale == self.scale


@dataclass(frozen=True)
class BlockOptions:
    blocks: Tuple[Block, ...]
    weights: Tuple[float, ...]    # one per partition
    backend: str
    chunk_size: Optional[int] = None

    def kwargs(self) -> dict:
        return chunk_kwargs(self.backend, self.chunk_size)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A block's scale as the backends take it (``core.checks.as_scalar_tensor``)."""
    return as_scalar_tensor("scale", value, like)


def _block_lse(impl, x, y, blk: Block, kw) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row lse, diagonal logit) of one block, float64; the diagonal is -inf when masked."""
    n = x.shape[0]
    if blk.plain:
        lse, _, diag = impl.lse_forward(x, y, _scalar(blk.scale, x), None, **kw)
        return lse, diag
    off, _, diag = impl.lse_forward_offdiag(x, y, _scalar(blk.scale, x), None, **kw)
    if blk.diag_scale is None:
        diag = torch.full((n,), float("-inf"), dtype=torch.float64, device=x.device)
    else:
        diag = diag * (blk.diag_scale / blk.scale)
    return combine_diag(off, diag), diag


def _kernel_diag(blk: Block, diag: torch.Tensor) -> Optional[torch.Tensor]:
    """The ``diag`` that ``grad_backward`` takes G's diagonal from: the positive's true
    logit (``diag_grad``'s ``expm1`` form, exact on a confident row); none for a plain
    block (the recomputed tile's P_ii, exact for a small P_ii too); -inf, so G_ii = 0
    exactly, for a masked diagonal or one at its own scale (added on the host)."""
    if blk.positive:
        return diag
    if blk.plain:
        return None
    return torch.full_like(diag, float("-inf"))


class BlockSoftmaxFunction(torch.autograd.Function):
    """Inputs: (opts, *features); see the module doc."""

    @staticmethod
    def forward(ctx, opts: BlockOptions, *feats: torch.Tensor):
        impl = backends.get_loaded(opts.backend)
        kw = opts.kwargs()
        parts: List[Optional[torch.Tensor]] = [None] * len(opts.weights)
        pos: List[Optional[torch.Tensor]] = [None] * len(opts.weights)
        diags = []
        for blk in opts.blocks:
            lse, diag = _block_lse(impl, feats[blk.x], feats[blk.y], blk, kw)
            diags.append(diag)
            p = blk.partition
            parts[p] = lse if parts[p] is None else torch.logaddexp(parts[p], lse)
            if blk.positive:
                pos[p] = diag
        n = feats[opts.blocks[0].x].shape[0]
        loss = sum(w * (lse - t).sum() for w, lse, t in zip(opts.weights, parts, pos)) / n
        ctx.opts = opts
        ctx.save_for_backward(*feats, *parts, *diags)
        return fresh_output(loss, feats[0].dtype)

    @staticmethod
    def _grads(ctx, grad_loss: torch.Tensor):
        opts: BlockOptions = ctx.opts
        saved = ctx.saved_tensors
        nf, npart = len(saved) - len(opts.weights) - len(opts.blocks), len(opts.weights)
        feats, parts, diags = saved[:nf], saved[nf:nf + npart], saved[nf + npart:]
        impl = backends.get_loaded(opts.backend)
        kw = opts.kwargs()
        acc = compute_dtype(feats[0].dtype)
        grads: List[Optional[torch.Tensor]] = [None] * nf
        n = feats[opts.blocks[0].x].shape[0]
        for blk, diag in zip(opts.blocks, diags):
            w = opts.weights[blk.partition] / n
            lse = parts[blk.partition]
            coef = w * blk.grad_scale / blk.scale
            x, y = feats[blk.x], feats[blk.y]
            d_x, d_y, _ = impl.grad_backward(x, y, _scalar(blk.scale, x), None, lse, None, coef, 0.0,
                                             coef if blk.positive else 0.0, diag=_kernel_diag(blk, diag),
                                             **kw)
            if not blk.positive and not blk.plain and blk.diag_scale is not None:
                # 4. The diagonal at its own scale, on the host: G_ii = w P_ii, exact for a small P_ii.
                g_ii = (w * blk.grad_scale * torch.exp(diag - lse)).to(acc)[:, None]
                d_x.add_(g_ii * y[:n].to(acc))
                d_y[:n].add_(g_ii * x.to(acc))
            for i, d in ((blk.x, d_x), (blk.y, d_y)):
                grads[i] = d if grads[i] is None else grads[i].add_(d)
        g = grad_loss.to(acc)
        out = tuple(None if d is None or not ctx.needs_input_grad[i + 1] else (d * g).to(f.dtype)
                    for i, (d, f) in enumerate(zip(grads, feats)))
        return (None,) + out

    backward = fused_backward("clip_fast's block softmax loss", _grads.__func__)

    vmap = refuse_vmap("clip_fast's block softmax loss", "call it once per batch")


def _resolve(backend: str, device: torch.device, dtype: torch.dtype, need_offdiag: bool):
    """The backend module; one with ``lse_forward_offdiag`` when a block needs it."""
    impl = backends.resolve_backend(backend, device, dtype)
    if not need_offdiag or hasattr(impl, "lse_forward_offdiag"):
        return impl
    if backend != "auto":
        raise ValueError(f"block_softmax_loss: backend={backend!r} has no lse_forward_offdiag, which a "
                         "masked or differently scaled diagonal needs; use backend='triton' or 'torch'")
    for name in ("triton", "torch"):
        if backends.unavailable_reason(name, device, dtype) is None:
            return backends.resolve_backend(name, device, dtype)
    raise ValueError(f"block_softmax_loss: no backend with lse_forward_offdiag runs on {device} / {dtype}")


def block_softmax_loss(features: Sequence[torch.Tensor], blocks: Sequence[Block],
                       weights: Sequence[float], *, backend: str = "auto",
                       chunk_size: Optional[int] = None) -> torch.Tensor:
    """The loss of the module doc: ``features`` (each (rows, D), one dtype and device),
    ``blocks`` over their indices, one weight per partition."""
    feats = list(features)
    if not feats or not blocks:
        raise ValueError("block_softmax_loss: needs at least one feature tensor and one block")
    ref = feats[0]
    for i, f in enumerate(feats):
        if f.dim() != 2 or f.dtype != ref.dtype or f.device != ref.device or f.shape[1] != ref.shape[1]:
            raise ValueError(f"block_softmax_loss: features[{i}] has shape {tuple(f.shape)}, {f.dtype} on "
                             f"{f.device}; expected (rows, {ref.shape[1]}) {ref.dtype} on {ref.device}")
    rows = {feats[b.x].shape[0] for b in blocks}
    if len(rows) != 1 or any(feats[b.y].shape[0] < feats[b.x].shape[0] for b in blocks):
        raise ValueError("block_softmax_loss: every block's anchors must have the same row count, and at "
                         f"most as many candidates; got {[(tuple(feats[b.x].shape), tuple(feats[b.y].shape)) for b in blocks]}")
    for p in range(len(weights)):
        if sum(b.positive for b in blocks if b.partition == p) != 1:
            raise ValueError(f"block_softmax_loss: partition {p} needs exactly one positive block")
    impl = _resolve(backend, ref.device, ref.dtype, any(not b.plain for b in blocks))
    opts = BlockOptions(tuple(blocks), tuple(float(w) for w in weights), impl.NAME, chunk_size)
    return BlockSoftmaxFunction.apply(opts, *feats)
