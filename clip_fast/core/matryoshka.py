"""The Matryoshka (nested-size) options and the prefix normalisation every nested loss
shares (``docs/matryoshka.md``): the option checks, each prefix's scalings as running sums
over the size segments, a prefix's features, and the normalisation's backward chain.

Size k's features are f_k(x[:, :d_k]): the prefix's L2 normalisation with
``renormalize`` (then f = x[:, :d] r, r = 1 / |x[:, :d]|) or the identity.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

# F.normalize's floor on a norm: a prefix of zeros is scaled by 1 / _NORM_EPS (and stays 0).
_NORM_EPS = 1e-12


@dataclass(frozen=True)
class NestedOptions:
    """The sizes (increasing), their loss weights, and whether each prefix is re-normalised."""
    dims: Tuple[int, ...]
    weights: Tuple[float, ...]
    renormalize: bool = True


def check_matryoshka(dims, weights, renormalize, dim: Optional[int]) -> NestedOptions:
    """``matryoshka_dims`` / ``matryoshka_weights`` / ``matryoshka_renormalize`` checked against
    the features' D (``dim``; None: not known yet, sizes only checked to be >= 1).  The sizes
    are sorted (the weights follow them), as sentence-transformers accepts them in any order."""
    if isinstance(dims, (int, torch.Tensor)) or not isinstance(dims, Sequence) or not len(dims):
        raise ValueError(f"matryoshka_dims must be a non-empty sequence of ints, got {dims!r}")
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"matryoshka_dims must hold ints, got {dims!r}")
    if any(int(d) < 1 or (dim is not None and int(d) > dim) for d in dims):
        bound = "D" if dim is None else f"D] = [1, {dim}"
        raise ValueError(f"matryoshka_dims must lie in [1, {bound}] (the features' D), got {tuple(dims)}")
    if len(set(int(d) for d in dims)) != len(dims):
        raise ValueError(f"matryoshka_dims must be distinct, got {tuple(dims)}")
    if weights is None:
        weights = [1.0] * len(dims)
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence) or len(weights) != len(dims):
        raise ValueError(f"matryoshka_weights must be None or a sequence of {len(dims)} floats (one per "
                         f"size of matryoshka_dims={tuple(dims)}), got {weights!r}")
    if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"matryoshka_weights must be finite floats, got {tuple(weights)}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"matryoshka_renormalize must be a bool, got {renormalize!r}")
    order = sorted(range(len(dims)), key=lambda i: int(dims[i]))
    return NestedOptions(tuple(int(dims[i]) for i in order), tuple(float(weights[i]) for i in order),
                         renormalize)


def scalings(x: torch.Tensor, dims: Sequence[int], renormalize: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(r, live), each (n_sizes, N): r_k = 1 / max(|x[:, :d_k]|, eps) in float64 (ones without
    renormalisation), live where the norm is above the floor (the chain term exists).  The
    squared norms are running sums over the segments, as the sweep's dot products are."""
    if not renormalize:
        ones = torch.ones(len(dims), x.shape[0], dtype=torch.float64, device=x.device)
        return ones, torch.zeros_like(ones, dtype=torch.bool)
    bounds = (0,) + tuple(dims)
    x64 = x.to(torch.float64)  # O(N * D): the norms in float64, rounded once into the scalings
    parts = torch.stack([x64[:, d0:d1].square().sum(dim=1) for d0, d1 in zip(bounds[:-1], bounds[1:])])
    norms = parts.cumsum(dim=0).sqrt_()
    return 1.0 / norms.clamp_min(_NORM_EPS), norms > _NORM_EPS


def prefix(x: Optional[torch.Tensor], d: int, renormalize: bool) -> Optional[torch.Tensor]:
    """Size d's features f(x[:, :d]) (hard negatives and the host's target terms use them)."""
    if x is None:
        return None
    p = x[:, :d]
    if not renormalize:
        return p
    return p / torch.linalg.vector_norm(p, dim=1, keepdim=True).clamp_min(_NORM_EPS)


def chain(d_out: torch.Tensor, x: torch.Tensor, d: int, r: torch.Tensor, live: torch.Tensor,
          d_feat: Optional[torch.Tensor], dot: Optional[torch.Tensor], renormalize: bool) -> None:
    """Add size d's normalisation chain to d_out[:, :d]: r (d_f - f <f, d_f>), with the dot
    <f, d_f> of the part already in d_out given as ``dot`` (float64, per row)."""
    if not renormalize:
        if d_feat is not None:
            d_out[:, :d] += d_feat
        return
    r = r.to(x.dtype)
    f = x[:, :d] * r[:, None]
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device) if dot is None else dot.clone()
    if d_feat is not None:
        total += (f * d_feat).sum(dim=1, dtype=torch.float64)
        d_out[:, :d] += d_feat * r[:, None]
    total = torch.where(live, total, 0.0).to(x.dtype)
    d_out[:, :d] -= f * (total * r)[:, None]


def chains(d_x: torch.Tensor, d_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor, nested: NestedOptions,
           rows, cols, u_row: torch.Tensor, u_col: torch.Tensor) -> None:
    """Every size's normalisation chain on a block's gradients through the partial sums:
    ``rows`` / ``cols`` are ``scalings`` of x and y, u_row / u_col the (n_sizes, N) float64
    dots <f, d f> (nothing without re-normalisation)."""
    for k, d in enumerate(nested.dims):
        chain(d_x, x, d, rows[0][k], rows[1][k], None, u_row[k], nested.renormalize)
        chain(d_y, y, d, cols[0][k], cols[1][k], None, u_col[k], nested.renormalize)

