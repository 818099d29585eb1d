"""Matryoshka CLIP loss in one sweep: the weighted sum of the CLIP loss at every nested
prefix size of the features, for the GEMM work of the largest size (``docs/matryoshka.md``).

loss = sum_k w_k * clip_loss(f_k(img[:, :d_k]), f_k(txt[:, :d_k]), ...)

with f_k the prefix's L2 normalisation (``renormalize=True``, the default: what
sentence-transformers' ``MatryoshkaLoss`` around a cosine-similarity loss computes, and what
makes each prefix a usable embedding on its own) or the identity.  Every option of
``clip_loss`` (positive groups, label smoothing, direction weight, hard negatives) applies
to each size as it does to one call.

forward:  ``nested_lse_forward`` (``backends.nested_ops(backend)``: torch's ``nested_torch`` or
          Triton's ``clip_fast.kernels.nested``) -> every size's row/column lse and diagonal
          from one pass over D (a prefix's normalisation is a per-row / per-column
          scaling of its partial dot products); then, per size, the O(N * D) target terms
          and the hard-negative blocks, exactly as ``ClipLossFunction`` forms them.
backward: ``nested_grad_backward`` -> the gradient through the partial sums
          (each segment multiplied once) and each size's u_k = <f_k, d f_k>; the target terms
          and negative blocks give each size's d_f_k explicitly; the normalisation chain
          d_x[:, :d_k] += r_k (d_f_k - f_k <f_k, d_f_k>) joins them per size.
Saved: the inputs and (n_sizes, N) float64 vectors, nothing N x N.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..core.autograd import (apply_function, bias_guard, bias_meta, finish_grads, fresh_output, fused_backward,
                             refuse_vmap)
# The options and the prefix normalisation are shared with the SigLIP loss (check_matryoshka is
# re-exported for the CLIP functional and module).
from ..core.matryoshka import NestedOptions, chain, check_matryoshka, prefix, scalings  # noqa: F401
from ..core.numerics import compute_dtype, compute_scalar
from . import backends
from .backends import nested_ops, torch_backend
from .function import LossOptions, TargetPlan, _neg_grad

def nested_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend of the nested sweep for ``backend``: "auto" takes the plain loss's choice
    (Triton on CUDA when it can run; a CUDA choice, forced by CLIP_FAST_BACKEND, becomes Triton,
    else torch); "triton" raises when it cannot run on the device (its nested kernels also take
    float64); "cuda" raises (no nested CUDA sweep); anything else goes to the registry."""
    if backend == "cuda":
        nested_ops("cuda")   # raises, naming the backends that have the sweep
    if backend == "auto":
        name = backends.resolve_backend("auto", device, dtype).NAME
        if name == "cuda":
            name = "triton" if backends.unavailable_reason("triton", device, dtype) is None else "torch"
        return name
    if backend == "triton":
        reason = backends.unavailable_reason("triton", device, torch.float32 if dtype == torch.float64 else dtype)
        if reason is not None:
            raise RuntimeError(f"clip_fast backend='triton' with matryoshka_dims cannot run on device={device} "
                               f"with dtype={dtype}: {reason}")
        return "triton"
    return backends.resolve_backend(backend, device, dtype).NAME



def sweep_operands(x, y, s, nested: NestedOptions):
    """(x_gemm, rs, r, c, (r64, live_r), (c64, live_c)) of the nested sweeps: the prefix
    scalings rounded once to the compute dtype (rs = scale * r formed in float64), or,
    without re-normalisation, the scale folded into x and no scalings; then the float64
    scalings and their masks for the chain."""
    r64, c64 = scalings(x, nested.dims, nested.renormalize), scalings(y, nested.dims, nested.renormalize)
    if not nested.renormalize:
        return x * s, None, None, None, r64, c64
    rs = (r64[0] * s.to(torch.float64)).to(x.dtype)
    return x, rs, r64[0].to(x.dtype), c64[0].to(x.dtype), r64, c64


def gemm_operands(backend: str, x_gemm: torch.Tensor, y: torch.Tensor, dtype: torch.dtype):
    """The nested sweep's GEMM operands: the compute dtype's for the torch backend; the input
    dtype's for Triton (fp16/bf16 tensor cores, fp32 accumulation; x_gemm = scale * x rounded
    to the input dtype without re-normalisation, as the materialised loss rounds it)."""
    if backend != "triton" or x_gemm.dtype == dtype:
        return x_gemm, y
    return x_gemm.to(dtype), y.to(dtype)


class NestedClipLossFunction(torch.autograd.Function):
    """Inputs: (img, txt, scale, bias, group_ids, neg_txt, neg_img, opts, nested)."""

    @staticmethod
    def forward(img, txt, scale, bias, ids, neg_txt, neg_img, opts: LossOptions, nested: NestedOptions):
        acc = compute_dtype(img.dtype)
        x, y, s = img.to(acc), txt.to(acc), compute_scalar(scale, acc)
        x_gemm, rs, _, c, _, _ = sweep_operands(x, y, s, nested)
        lse_forward, _ = nested_ops(opts.backend)
        x_gemm, y_gemm = gemm_operands(opts.backend, x_gemm, y, img.dtype)
        lse_row, lse_col, diag = lse_forward(x_gemm, y_gemm, nested.dims, rs, c, opts.chunk_size)
        total = torch.zeros((), dtype=torch.float64, device=img.device)
        for k, sz in enumerate(_sizes(x, y, neg_txt, neg_img, ids, opts, nested)):
            if sz.plan.neg_txt is not None:  # hard negatives join the row / column softmax
                lse_row[k] = torch.logaddexp(lse_row[k], torch_backend.lse_forward(sz.x, sz.plan.neg_txt, s)[0])
            if sz.plan.neg_img is not None:
                lse_col[k] = torch.logaddexp(lse_col[k], torch_backend.lse_forward(sz.plan.neg_img, sz.y, s)[1])
            a, b = sz.plan.a, sz.plan.b
            loss = a * (lse_row[k] - diag[k]).sum() + b * (lse_col[k] - diag[k]).sum()
            if not sz.plan.plain:
                t, w_diag = sz.plan.target_sums(sz.x, sz.y, sz.neg_txt, sz.neg_img, acc)
                loss = loss + ((a + b - w_diag) * diag[k]).sum() - s.to(torch.float64) * t
            total = total + nested.weights[k] * loss
        total = total + bias_guard(bias)
        return fresh_output(total, opts.loss_dtype or img.dtype), lse_row, lse_col, diag

    @staticmethod
    def setup_context(ctx, inputs, output):
        img, txt, scale, bias, ids, neg_txt, neg_img, opts, nested = inputs
        _, lse_row, lse_col, diag = output
        ctx.save_for_backward(img, txt, scale, lse_row, lse_col, diag, ids, neg_txt, neg_img)
        ctx.opts, ctx.nested = opts, nested
        ctx.bias_meta = bias_meta(bias)
        ctx.mark_non_differentiable(lse_row, lse_col, diag)

    @staticmethod
    def _grads(ctx, grad_loss: torch.Tensor):
        img, txt, scale, lse_row, lse_col, diag, ids, neg_txt, neg_img = ctx.saved_tensors
        opts, nested = ctx.opts, ctx.nested
        acc = compute_dtype(img.dtype)
        x, y, s = img.to(acc), txt.to(acc), compute_scalar(scale, acc)
        x_gemm, rs, r_sweep, c_sweep, (r, live_r), (c, live_c) = sweep_operands(x, y, s, nested)
        coefs, extra = ([], [], []), []
        d_scale = torch.zeros((), dtype=torch.float64, device=img.device)
        d_neg = [None if t is None else torch.zeros_like(t, dtype=acc) for t in (neg_txt, neg_img)]
        for k, sz in enumerate(_sizes(x, y, neg_txt, neg_img, ids, opts, nested)):
            w, (a, b) = nested.weights[k], (sz.plan.a, sz.plan.b)
            host = _size_host_grads(sz, k, w, s, lse_row, lse_col, acc)
            coefs[0].append(w * a)
            coefs[1].append(w * b)
            coefs[2].append(w * host.w_diag if host.w_diag is not None else w * (a + b))
            extra.append(host)
            d_scale = d_scale + host.d_scale
            for i, (dn, neg) in enumerate(zip(host.d_neg, (neg_txt, neg_img))):
                if dn is not None:
                    rn, live_n = scalings(neg.to(acc), (sz.d,), nested.renormalize)
                    chain(d_neg[i], neg.to(acc), sz.d, rn[0], live_n[0], dn, None, nested.renormalize)
        _, grad_backward = nested_ops(opts.backend)
        x_gemm, y_gemm = gemm_operands(opts.backend, x_gemm, y, img.dtype)
        d_x, d_y, u_row, u_col, ds = grad_backward(x_gemm, x, y_gemm, s, nested.dims, rs, r_sweep, c_sweep,
                                                   lse_row, lse_col, diag, coefs, chunk_size=opts.chunk_size)
        for k, d in enumerate(nested.dims):
            chain(d_x, x, d, r[k], live_r[k], extra[k].d_x, u_row[k], nested.renormalize)
            chain(d_y, y, d, c[k], live_c[k], extra[k].d_y, u_col[k], nested.renormalize)
        out = finish_grads(d_x, d_y, (d_scale + ds).to(acc), grad_loss, img, txt, scale, ctx.bias_meta,
                           ctx.needs_input_grad)
        g = grad_loss.to(acc)
        return out[:4] + (None, _neg_grad(d_neg[0], g, neg_txt, ctx.needs_input_grad[5]),
                          _neg_grad(d_neg[1], g, neg_img, ctx.needs_input_grad[6])) + out[4:] + (None,)

    backward = fused_backward("clip_fast's Matryoshka CLIP loss", _grads.__func__)

    vmap = refuse_vmap("clip_fast's Matryoshka CLIP loss",
                       "call it once per batch element, or stack the batches along N")


@dataclass
class _Size:
    """One size's prefix features and target plan."""
    d: int
    x: torch.Tensor
    y: torch.Tensor
    neg_txt: Optional[torch.Tensor]
    neg_img: Optional[torch.Tensor]
    plan: TargetPlan


def _sizes(x, y, neg_txt, neg_img, ids, opts, nested: NestedOptions):
    acc = x.dtype
    # The prefix features are read only by the target terms and the negative blocks.
    needed = ids is not None or opts.label_smoothing or neg_txt is not None or neg_img is not None
    for d in nested.dims:
        px, py = (prefix(x, d, nested.renormalize), prefix(y, d, nested.renormalize)) if needed else (x, y)
        nt = None if neg_txt is None else prefix(neg_txt.to(acc), d, nested.renormalize)
        ni = None if neg_img is None else prefix(neg_img.to(acc), d, nested.renormalize)
        yield _Size(d, px, py, nt, ni, TargetPlan(px, py, ids, nt, ni, opts))


@dataclass
class _HostGrads:
    """One size's gradients outside the nested sweep, already weighted: d_f of the prefix
    features (None: zero), the negatives' d_f, d_scale, and the diagonal's target weights."""
    d_x: Optional[torch.Tensor]
    d_y: Optional[torch.Tensor]
    d_neg: list
    d_scale: torch.Tensor
    w_diag: Optional[torch.Tensor]


def _size_host_grads(sz: _Size, k: int, w: float, s, lse_row, lse_col, acc) -> _HostGrads:
    """Size k's target terms (``TargetPlan``) and hard-negative blocks (the torch backend's
    sweeps on the prefix features), as ``ClipLossFunction``'s backward forms them."""
    plan = sz.plan
    d_x = d_y = None
    d_neg = [None, None]
    d_scale = torch.zeros((), dtype=torch.float64, device=s.device)
    w_diag = None
    qs = None
    if not plan.plain:
        qs = plan.target_grads(sz.x, sz.y, sz.neg_txt, sz.neg_img, acc)
        w_diag, d_scale = qs.w_diag, d_scale - w * qs.t
        if qs.img is not None:
            d_x, d_y = qs.img * (-w * s), qs.txt * (-w * s)
    if plan.neg_txt is not None:  # block (img, neg_txt): the row softmax only
        di, dn, ds = torch_backend.grad_backward(sz.x, plan.neg_txt, s, None, lse_row[k], None, w * plan.a, 0.0, 0.0)
        d_x = di if d_x is None else d_x + di
        if qs is not None and qs.neg_txt is not None:
            dn = dn - qs.neg_txt * (w * s)
        d_neg[0], d_scale = dn, d_scale + ds.to(torch.float64)
    if plan.neg_img is not None:  # block (neg_img, txt): the column softmax only
        dn, dt, ds = torch_backend.grad_backward(plan.neg_img, sz.y, s, None, None, lse_col[k], 0.0, w * plan.b, 0.0)
        d_y = dt if d_y is None else d_y + dt
        if qs is not None and qs.neg_img is not None:
            dn = dn - qs.neg_img * (w * s)
        d_neg[1], d_scale = dn, d_scale + ds.to(torch.float64)
    return _HostGrads(d_x, d_y, d_neg, d_scale, w_diag)


def nested_clip_loss(call, nested: NestedOptions) -> torch.Tensor:
    """The Matryoshka loss of one prepared call (``functional.prepare_call``)."""
    return apply_function(NestedClipLossFunction, call.opts.loss_dtype, call.img, call.txt, call.scale,
                          call.bias, call.ids, call.neg_txt, call.neg_img, call.opts, nested)[0]
