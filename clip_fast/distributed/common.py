"""Helpers the gather and ring Functions share."""
from __future__ import annotations

import torch

from .. import backends
from ..backends import compute_scalar
from .agreement import Layout


def backend_args(layout: Layout, scale, acc: torch.dtype):
    """The backend module, its keyword arguments, and scale as a 0-d compute-dtype tensor.

    No bias: it shifts every logit equally, so it cancels from every softmax of this loss
    and is kept out of the arithmetic.
    """
    return (backends.get_loaded(layout.opts.backend), layout.opts.kwargs(),
            compute_scalar(scale, acc))


def rowdot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """<a_i, b_i> for every row, accumulated in ``dtype``."""
    return (a.to(dtype) * b.to(dtype)).sum(dim=1)
