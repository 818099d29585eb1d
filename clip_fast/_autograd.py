"""Rules every clip_fast ``autograd.Function`` follows: a fresh forward output, a backward
without autocast."""
from __future__ import annotations

import functools
from typing import Callable

import torch


def fresh_output(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a new tensor of ``dtype``: never ``t`` itself, even when the dtype matches.

    A forward must not return a tensor object it also holds as an intermediate.
    ``torch.compile`` in torch 2.11 traces a Function's forward into a subgraph whose
    outputs are the real outputs followed by every intermediate tensor of the forward,
    and runs it as a new Function.  When the loss is ``t.to(dtype)`` with ``t`` already in
    ``dtype``, that call returns ``t`` itself, so the same object sits in two output slots;
    autograd wires it to the later (intermediate) slot, the traced backward reads the
    first one, and every gradient comes back as zeros.  A copy keeps the slots distinct;
    it costs one scalar.
    """
    return t.to(dtype, copy=True)


def autocast_off(backward: Callable) -> Callable:
    """Decorate a Function's ``backward`` to run with autocast off on the gradient's device.

    The forward already runs with autocast off (the callers cast the features to the
    autocast dtype first), but a backward runs under whatever autocast state is active
    where it runs: ``loss.backward()`` inside the ``torch.autocast`` region, or a
    ``torch.compile`` graph, which traces the backward inside the forward's region.
    There autocast would run the backends' float32 matmuls in the autocast dtype, and the
    torch backend's ``d_scale`` dot would fail on mixed dtypes.
    """
    @functools.wraps(backward)
    def run(ctx, *grads):
        with torch.autocast(grads[0].device.type, enabled=False):
            return backward(ctx, *grads)
    return run
