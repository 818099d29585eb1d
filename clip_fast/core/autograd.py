"""The rules every clip_fast autograd Function follows, for every loss.

* ``fresh_output``      -- a forward returns a new tensor, never an intermediate it holds.
* ``autocast_off``      -- a backward runs with autocast off.
* ``first_order_only``  -- gradients that raise on a second differentiation.
* ``fused_backward``    -- a Function's backward from its gradient sweep, with the three rules above.
* ``refuse_vmap``       -- a Function's ``vmap`` that says torch.func.vmap is not supported.
* ``finish_grads``      -- the backward tail: upstream gradient, dtypes, the bias's exact zero.
* ``bias_guard``, ``bias_meta`` -- a ``logit_bias`` that cancels from a softmax loss.
* ``autocast_features`` -- autocast's matmul cast policy applied to the features.
* ``needs_grad``        -- whether autograd will want a gradient from this call.
* ``apply_function``    -- ``Function.apply`` with autocast off when the features were cast.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

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


def fused_backward(what: str, grads: Callable) -> staticmethod:
    """A Function's ``backward`` from ``grads(ctx, grad_loss) -> tuple``, the fused sweep:
    autocast off (``autocast_off``), no autograd graph inside it, and gradients that refuse
    a second differentiation (``first_order_only``, whose messages name ``what``)."""
    @autocast_off
    def backward(ctx, grad_loss: torch.Tensor, *unused):
        with torch.no_grad():
            out = grads(ctx, grad_loss)
        return first_order_only(what, out)
    return staticmethod(backward)


def refuse_vmap(what: str, advice: str) -> staticmethod:
    """A Function's ``vmap`` rule that raises: a batch of losses would need a batch of fused
    sweeps, which the kernels do not take; ``advice`` says what to do instead."""
    def vmap(info, in_dims, *args):
        raise NotImplementedError(f"{what} does not support torch.func.vmap (a batch of losses); {advice}")
    return staticmethod(vmap)


def finish_grads(d_img, d_txt, d_scale, grad_loss, img, txt, scale, bias_meta, needs) -> tuple:
    """The backward tail every loss Function shares.

    Multiplies the backend's float32/64 gradients by the upstream gradient ``grad_loss``
    (None: already applied), casts them to the inputs' dtypes and shapes, and gives a
    ``logit_bias`` (``bias_meta = (shape, dtype, device)``, or None) an exact zero
    gradient: every row and column of a softmax sums to one, so a shared bias cancels.
    Returns the Function's gradient tuple, None for the non-tensor options argument.
    """
    if grad_loss is not None:
        g = grad_loss.to(d_img.dtype)
        d_img, d_txt, d_scale = d_img * g, d_txt * g, d_scale * g
    d_bias = None
    if bias_meta is not None and needs[3]:
        shape, dtype, device = bias_meta
        d_bias = torch.zeros(shape, dtype=dtype, device=device)
    return (d_img.to(img.dtype) if needs[0] else None,
            d_txt.to(txt.dtype) if needs[1] else None,
            d_scale.to(scale.dtype).reshape(scale.shape) if needs[2] else None,
            d_bias, None)


def bias_guard(bias: Optional[torch.Tensor]) -> torch.Tensor | float:
    """0 (float64) for a finite ``logit_bias``, NaN for a NaN or infinite one (0 without a bias).

    The bias cancels from every softmax and never enters the arithmetic, but a bias that
    has gone bad is a training failure: added to the loss, this makes it non-finite, as
    the materialised loss would be.  No gradient flows through it (the Function gives
    the bias its exact zero gradient).
    """
    if bias is None:
        return 0.0
    return (bias.detach().to(torch.float64) * 0.0).sum()


def bias_meta(bias: Optional[torch.Tensor]):
    """What the backward needs of ``logit_bias`` to give it a zero gradient (no saved tensor)."""
    return None if bias is None else (bias.shape, bias.dtype, bias.device)


def autocast_features(image_features: torch.Tensor, text_features: torch.Tensor):
    """Apply autocast's policy for a matmul to the features: ``(img, txt, loss_dtype)``.

    Under ``torch.autocast`` a matmul runs floating inputs other than float64 in the
    autocast dtype and leaves float64 alone; the loss the fused sweep returns is then
    float32, as autocast's softmax/cross-entropy would give.  ``loss_dtype`` is None
    when autocast is off (or leaves these features alone): the loss takes the features' dtype.
    """
    device_type = image_features.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...): never cast
        return image_features, text_features, None
    if not enabled or image_features.dtype == torch.float64:
        return image_features, text_features, None
    dtype = torch.get_autocast_dtype(device_type)
    return image_features.to(dtype), text_features.to(dtype), torch.float32


def needs_grad(*tensors) -> bool:
    """Whether autograd will want a gradient of any of ``tensors`` from this call."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def apply_function(fn, loss_dtype: Optional[torch.dtype], *args):
    """``fn.apply(*args)``; with autocast off inside when ``autocast_features`` cast the
    features (``loss_dtype`` set): the loss is formed in float32 from the cast features.
    ``args[0]`` is a features tensor (its device type names the autocast to turn off)."""
    if loss_dtype is None:
        return fn.apply(*args)
    with torch.autocast(args[0].device.type, enabled=False):
        return fn.apply(*args)
