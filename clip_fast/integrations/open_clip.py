"""One switch that makes open_clip (and its trainer, ``open_clip_train``) build clip_fast's losses.

    from clip_fast.integrations.open_clip import use_fast_losses
    use_fast_losses()            # or: with use_fast_losses(): ...

open_clip's trainer gets its loss from ``open_clip.create_loss(args)``, a name several
modules bind at import (``open_clip``, ``open_clip.factory``, ``open_clip_train.main``):
patching one of them silently leaves the others building open_clip's own losses.  The
switch replaces the function under every module that holds it now, so a module imported
later (``from open_clip import create_loss``) binds the replacement too.

What ``create_fast_loss(args)`` builds, in open_clip's order of precedence:

    args.distill            FastDistillClipLoss   (open_clip: DistillClipLoss)
    "coca" in args.model    FastCoCaLoss          (CoCaLoss)
    args.siglip             FastSigLipLoss        (SigLipLoss, with args.loss_dist_impl)
    otherwise               FastClipLoss          (ClipLoss)

with open_clip's arguments (``local_loss``, ``gather_with_grad``, ``cache_labels=True``,
``rank``, ``world_size``) and the switch's ``backend`` and ``chunk_size``, which reach every
loss built.  What clip_fast does not provide is refused with a message saying what, never
quietly built with open_clip's loss: ``--horovod``.  open_clip's loss classes themselves
(``open_clip.ClipLoss``, ...) are left alone: code that builds them by name still gets them.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable, List, Optional, Tuple

_LOG = logging.getLogger(__name__)


class UnsupportedByClipFast(NotImplementedError):
    """open_clip's arguments ask for a loss or mode clip_fast does not provide."""


def _refuse(what: str) -> None:
    raise UnsupportedByClipFast(
        f"clip_fast.integrations.open_clip: {what}. Run without use_fast_losses() (or without "
        "`python -m clip_fast.open_clip_train`) to train with open_clip's own losses.")


def create_fast_loss(args, *, backend: str = "auto", chunk_size: Optional[int] = None):
    """``open_clip.create_loss(args)`` with clip_fast's fused twins (see the module doc)."""
    import clip_fast

    if getattr(args, "horovod", False):
        _refuse("--horovod is not supported (clip_fast's distributed losses use torch.distributed; "
                "launch with torchrun instead)")
    every = dict(cache_labels=True, rank=args.rank, world_size=args.world_size, use_horovod=False,
                 backend=backend, chunk_size=chunk_size)
    common = dict(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, **every)
    if getattr(args, "distill", False):
        return clip_fast.FastDistillClipLoss(**common)
    if "coca" in args.model.lower():
        return clip_fast.FastCoCaLoss(caption_loss_weight=args.coca_caption_loss_weight,
                                      clip_loss_weight=args.coca_contrastive_loss_weight, **common)
    if getattr(args, "siglip", False):
        return clip_fast.FastSigLipLoss(dist_impl=getattr(args, "loss_dist_impl", None), **every)
    return clip_fast.FastClipLoss(**common)


class FastLosses:
    """The switch's handle: ``restore()`` (or leaving its ``with`` block) puts open_clip's back."""

    def __init__(self, patched: List[Tuple[object, Callable]]):
        self._patched = patched

    def restore(self) -> None:
        for module, original in self._patched:
            module.create_loss = original
        self._patched = []

    def __enter__(self) -> "FastLosses":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def use_fast_losses(backend: str = "auto", chunk_size: Optional[int] = None) -> FastLosses:
    """Make ``open_clip.create_loss``, and every module that bound it, build clip_fast's losses.

    ``backend`` and ``chunk_size`` are passed to every loss built.  Returns a handle whose
    ``restore()`` undoes the switch; usable as a context manager.
    """
    import open_clip
    import open_clip.factory

    original = open_clip.factory.create_loss
    original = getattr(original, "__wrapped_open_clip__", original)  # switching twice is harmless

    def create_loss(args):
        loss = create_fast_loss(args, backend=backend, chunk_size=chunk_size)
        _LOG.info("clip_fast: open_clip.create_loss builds %s", loss)
        return loss

    create_loss.__doc__ = create_fast_loss.__doc__
    create_loss.__wrapped_open_clip__ = original
    patched = []
    for module in list(sys.modules.values()):
        # The module's own namespace: some modules (torch.classes) answer any getattr.
        current = getattr(module, "__dict__", {}).get("create_loss")
        if callable(current) and getattr(current, "__wrapped_open_clip__", current) is original:
            patched.append((module, current))
            module.create_loss = create_loss
    return FastLosses(patched)
