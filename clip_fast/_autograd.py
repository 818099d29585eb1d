"""Rules every clip_fast ``autograd.Function`` follows: a fresh forward output, a backward
without autocast, and gradients that refuse a second differentiation."""
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
        device_type = grads[0].device.type
        try:
            # Always entered, not only when autocast is on now: torch.compile traces the
            # backward before it runs inside the caller's autocast region.
            off = torch.autocast(device_type, enabled=False)
        except RuntimeError:  # a device type autocast does not know (meta): nothing to turn off
            return backward(ctx, *grads)
        with off:
            return backward(ctx, *grads)
    return run


def first_order_only(what: str, grads: tuple) -> tuple:
    """Gradients that raise if anything differentiates through them again.

    The backward is a fused kernel sweep with no derivative of its own.  Under
    ``create_graph=True`` (grad mode on in the backward; ``torch.func.grad`` runs it so
    too) the gradients are returned through a node that raises a clear error on a second
    backward, like ``torch.autograd.function.once_differentiable`` but also when the
    upstream gradient itself needs no grad: a gradient penalty built on them must fail,
    not silently lose its second-order terms.  First-order use is unaffected.
    """
    if not torch.is_grad_enabled():
        return grads
    if torch._C._are_functorch_transforms_active():
        # torch.func: one grad level is a first-order gradient (functorch runs every
        # backward with grad mode on); a deeper stack (grad of grad, jacrev of grad, vmap
        # over grad) would differentiate this backward, which has no derivative.
        level = torch._C._functorch.maybe_current_level()
        if level is not None and level > 1:
            raise RuntimeError(f"{what} supports one torch.func.grad level, not nested torch.func "
                               "transforms (grad of grad, jacrev, vmap over grad): its backward is "
                               "a fused kernel sweep with no derivative of its own")
        return grads
    live = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    if not live:
        return grads
    message = (f"{what} does not support double backward (a gradient of its gradient, e.g. "
               "torch.autograd.grad(..., create_graph=True) then backward through the result): "
               "its backward is a fused kernel sweep. Use a materialised loss, e.g. open_clip's "
               "ClipLoss, for higher-order gradients").encode()
    err_fn = torch._C._functions.DelayedError(message, len(live))
    wrapped = err_fn(*[grads[i].detach().requires_grad_(True) for i in live])
    wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
    out = list(grads)
    for i, w in zip(live, wrapped):
        out[i] = w
    return tuple(out)
