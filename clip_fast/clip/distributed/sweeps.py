"""The block sweeps the distributed modes are built from: one loss size (the backend's
``lse_forward`` / ``grad_backward``) or every Matryoshka size at once (the nested sweeps).

Both objects answer the same calls, so ``gather`` and ``ring`` run one code path for either;
the two sweeps of one (M, K) block, then what the losses form around them:

``lse(x, y) -> (lse_row, lse_col, diag)``
    float64; (M,), (K,), (min(M, K),) for one size, with a leading ``n_sizes`` axis for the
    nested sweep (the statistics of size k in row k).
``grad(x, y, lse_row, lse_col, a, b, w, diag=None, split_scale=False) -> (d_x, d_y, d_scale)``
    the backend contract's gradient of G = a P_row + b P_col - w I (``clip_fast.clip.backends``)
    with respect to the raw features; for the nested sweep, of sum_k weight_k G_k, the
    prefix normalisation included (so every output is a block's gradient like any other,
    and the distributed modes sum, reduce-scatter and pass them on unchanged).
``total(t)``: a loss from per-row terms, t of ``lse``'s shape: the sum, weighted per size.
``stats(n)``: the shape of ``lse``'s statistics over n rows.
``host(x, y, block) -> HostTerms``: a block's target terms beyond the sweeps
    (``clip_fast.clip.targets``; ``block(x, y) -> (qx, qy, t, ...)``) on the features of every
    size: the weighted sum of t, the rest of the block's answer (the same for every size),
    and ``sub_terms(d_x, d_y, x, y, terms)`` takes s * qx and s * qy from d_x and d_y through
    each size's normalisation chain.  ``host_sum`` and ``sub_host`` are the two in one call.
``features(*tensors)``: ``(weight, [each tensor's features])`` of every size (the ring's
    positive-pair dot sums and label smoothing's feature sums are formed on them).

The nested sweep's prefix normalisation is per row, so a block's scalings come from its
own rows (``matryoshka.sweep_operands``): nothing beyond the features travels between
ranks, and the normalisation chain is linear in G, so each block's gradient is finished
on its own: d_x[:, :d_k] -= f_k u_k r_k with u_k = sum_j G_k S_k along the block's rows
(``matryoshka.chain``), likewise for the columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ...core.numerics import scale_grad_from_rows
from .. import backends

_F64 = torch.float64


@dataclass
class HostTerms:
    """A block's host target terms over the sizes: per size (k, d_k, weight_k, qx, qy), the
    weighted t, and the rest of the block's answer (``w_diag`` for a strip with label pairs)."""
    parts: List[tuple]
    t: object
    rest: tuple


class _Sweeps:
    """What both kinds share: the host terms from ``features`` and ``chain_one``."""

    def host(self, x, y, block) -> HostTerms:
        parts, t, rest = [], 0.0, ()
        for k, (wk, (px, py)) in enumerate(self.features(x, y)):
            out = block(px, py)
            parts.append((k, px.shape[1], wk, out[0], out[1]))
            t, rest = t + wk * out[2], out[3:]
        return HostTerms(parts, t, rest)

    def sub_terms(self, d_x, d_y, x, y, terms: HostTerms) -> None:
        for k, d, wk, qx, qy in terms.parts:
            for d_out, feats, q in ((d_x, x, qx), (d_y, y, qy)):
                if d_out is not None:
                    self.chain_one(d_out, feats, k, d, q * (-wk * self.s))

    def host_sum(self, x, y, block):
        terms = self.host(x, y, block)
        return terms.t, terms.rest

    def sub_host(self, d_x, d_y, x, y, block):
        terms = self.host(x, y, block)
        self.sub_terms(d_x, d_y, x, y, terms)
        return terms.t


class PlainSweeps(_Sweeps):
    """The backend's two sweeps: one loss size."""
    sizes = 1

    def __init__(self, impl, kw: dict, s: torch.Tensor):
        self.impl, self.kw, self.s = impl, kw, s

    def lse(self, x, y):
        return self.impl.lse_forward(x, y, self.s, None, **self.kw)

    def grad(self, x, y, lse_row, lse_col, a, b, w, diag=None, split_scale=False):
        return self.impl.grad_backward(x, y, self.s, None, lse_row, lse_col, a, b, w, diag=diag,
                                       split_scale=split_scale, **self.kw)

    @staticmethod
    def total(t: torch.Tensor) -> torch.Tensor:
        return t.sum()

    @staticmethod
    def features(*tensors):
        return [(1.0, list(tensors))]

    @staticmethod
    def chain_one(d_out, x, k, d, d_feat) -> None:
        d_out.add_(d_feat)

    @staticmethod
    def stats(n: int) -> Tuple[int, ...]:
        return (n,)


def nested_pair(backend: str):
    """(nested_lse_forward, nested_grad_backward) of a backend: the one indirection through
    which the distributed modes reach the nested sweeps (signatures of
    ``clip_fast.clip.backends.nested_torch``): "torch" or "triton", both taking rectangular
    blocks; anything else raises (``backends.nested_ops``)."""
    return backends.nested_ops(backend)


class NestedSweeps(_Sweeps):
    """Every Matryoshka size of a block from one pass over D (``clip_fast.clip.matryoshka``)."""

    def __init__(self, nested, backend: str, chunk_size: Optional[int], s: torch.Tensor, acc: torch.dtype):
        self.forward, self.backward = nested_pair(backend)
        self.nested, self.chunk, self.s, self.acc = nested, chunk_size, s, acc
        self.sizes = len(nested.dims)

    def lse(self, x, y):
        from ..matryoshka import sweep_operands

        x, y = x.to(self.acc), y.to(self.acc)
        x_gemm, rs, _, c, _, _ = sweep_operands(x, y, self.s, self.nested)
        return self.forward(x_gemm, y, self.nested.dims, rs, c, self.chunk)

    def grad(self, x, y, lse_row, lse_col, a, b, w, diag=None, split_scale=False):
        if not split_scale:
            return self._grad(x, y, lse_row, lse_col, a, b, w, diag)
        # [the row term's share of d_scale, the column term's] of a block without label pairs
        # (the ring's off-diagonal blocks, whose rows and columns belong to two ranks' losses):
        # the two terms swept apart, twice the block's backward work.
        if diag is not None or w:
            raise ValueError("split_scale is for a block without label pairs (diag None, w = 0)")
        d_x, d_y, ds_row = self._grad(x, y, lse_row, None, a, 0.0, 0.0, None)
        d_x2, d_y2, ds_col = self._grad(x, y, None, lse_col, 0.0, b, 0.0, None)
        return d_x.add_(d_x2), d_y.add_(d_y2), torch.stack([ds_row, ds_col])

    def _grad(self, x, y, lse_row, lse_col, a, b, w, diag):
        from ..matryoshka import chain, sweep_operands

        nested, s, acc, k_sizes = self.nested, self.s, self.acc, self.sizes
        x, y = x.to(acc), y.to(acc)
        x_gemm, rs, r_sweep, c_sweep, (r, live_r), (c, live_c) = sweep_operands(x, y, s, nested)
        if diag is None:  # a block without label pairs: its diagonal entries as the sweep forms them
            diag = _block_diag(x_gemm, y, rs, c_sweep, nested.dims)
        lse_row = _stats_or_zeros(lse_row, k_sizes, x)
        lse_col = _stats_or_zeros(lse_col, k_sizes, y)
        wts = nested.weights
        coefs = ([wk * a for wk in wts], [wk * b for wk in wts], [wk * w for wk in wts])
        d_x, d_y, u_row, u_col, ds = self.backward(x_gemm, x, y, s, nested.dims, rs, r_sweep, c_sweep,
                                                   lse_row, lse_col, diag, coefs, chunk_size=self.chunk)
        if not a:  # a column-only G sums to ~0 down each column: contract over the rows first
            ds = scale_grad_from_rows(d_x, x, d_y, y, 0.0, s.to(_F64), ds)
        for k, d in enumerate(nested.dims):
            chain(d_x, x, d, r[k], live_r[k], None, u_row[k], nested.renormalize)
            chain(d_y, y, d, c[k], live_c[k], None, u_col[k], nested.renormalize)
        return d_x, d_y, ds.to(_F64)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        w = torch.tensor(self.nested.weights, dtype=_F64, device=t.device)
        return (t.sum(dim=-1) * w).sum()

    def stats(self, n: int) -> Tuple[int, ...]:
        return (self.sizes, n)

    def features(self, *tensors):
        from ..matryoshka import prefix

        nested = self.nested
        return [(wk, [None if t is None else prefix(t.to(self.acc), d, nested.renormalize) for t in tensors])
                for d, wk in zip(nested.dims, nested.weights)]

    def chain_one(self, d_out, x, k, d, d_feat) -> None:
        """Size k's d_f (of the prefix features) into the raw features' gradient."""
        from ..matryoshka import chain, scalings

        x = x.to(self.acc)
        r, live = scalings(x[:, :d], (d,), self.nested.renormalize)
        chain(d_out, x, d, r[0], live[0], d_feat, None, self.nested.renormalize)


def _stats_or_zeros(v: Optional[torch.Tensor], sizes: int, like: torch.Tensor) -> torch.Tensor:
    """A direction's lse, or zeros where its coefficient is 0 (the sweep never reads it then)."""
    if v is not None:
        return v
    return torch.zeros(sizes, like.shape[0], dtype=_F64, device=like.device)


def _block_diag(x_gemm, y, rs, c, dims) -> torch.Tensor:
    """(n_sizes, min(M, K)) float64: S_k[i, i] of every size, from running row dots over the
    segments (a block whose diagonal holds no label pair: G_ii is an ordinary entry)."""
    n = min(x_gemm.shape[0], y.shape[0])
    xd, yd = x_gemm[:n], y[:n]
    bounds = (0,) + tuple(dims)
    parts = torch.stack([(xd[:, d0:d1] * yd[:, d0:d1]).sum(dim=1) for d0, d1 in zip(bounds[:-1], bounds[1:])])
    run = parts.cumsum(dim=0)
    if rs is not None:
        run = run * rs[:, :n] * c[:, :n]
    return run.to(_F64)


def make_sweeps(layout, s: torch.Tensor, acc: torch.dtype):
    """The sweeps of a distributed call: nested when the layout carries Matryoshka options."""
    opts = layout.opts
    if layout.nested is not None:
        return NestedSweeps(layout.nested, opts.backend, opts.chunk_size, s, acc)
    return PlainSweeps(backends.get_loaded(opts.backend), opts.kwargs(), s)
