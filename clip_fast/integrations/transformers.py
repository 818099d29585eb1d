"""Hugging Face transformers' ``CLIPModel``, ``SiglipModel`` and ``Siglip2Model`` with the loss fused.

    from clip_fast.integrations.transformers import use_fast_hf_losses, apply_fast_loss
    with use_fast_hf_losses():                    # every supported model class, restored on exit
        out = model(**batch, return_loss=True)
    apply_fast_loss(model, distributed="global")  # one instance, until remove_fast_loss(model)

What changes.  ``model(..., return_loss=True)`` runs the model's own forward with
``return_loss=False`` (encoders, projections, normalisation, logits: all transformers'), then
puts in ``loss`` the fused loss of the output's normalised ``image_embeds`` / ``text_embeds``:

  * CLIP family: ``clip_fast.clip_loss(image_embeds, text_embeds, logit_scale.exp())``, which is
    transformers' ``image_text_contrastive_loss(logits_per_text)`` (mean of the two cross
    entropies) without the N x N logits, softmaxes and their gradients;
  * SigLIP and SigLIP 2: ``clip_fast.siglip_loss(..., logit_scale.exp(), logit_bias)``, which is
    transformers' ``-logsigmoid(m1_diag1 * logits_per_text).sum(-1).mean()`` without the
    ``eye``, the +-1 mask, the log-sigmoid and the logits' gradient.

Gradients reach every parameter as transformers' loss sends them, ``logit_scale`` and
``logit_bias`` included.  Calls without ``return_loss`` are transformers' own, untouched.

``distributed``:
  * ``"per_shard"`` (default, transformers' behaviour): each process contrasts its own batch;
  * ``"global"``: under an initialised ``torch.distributed`` group of more than one process,
    every rank's pairs: CLIP as open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``
    (this rank's rows against every rank's columns, gradients sent back to each row's owner;
    ``clip_dist_impl`` "gather" or "ring"), SigLIP as open_clip's ``SigLipLoss`` with
    ``siglip_dist_impl`` ("bidir", "shift", "reduce", "gather": same loss, other exchanges).
    With DDP's gradient averaging the update is the gradient of the mean of the ranks' losses,
    which with equal shards is the loss of the whole global batch.  One process: as per-shard.

``logits``:
  * ``"keep"`` (default): ``logits_per_image`` / ``logits_per_text`` are transformers' own tensors,
    with autograd (metrics, zero-shot probabilities and extra loss terms keep working).  The
    loss does not use them: when the output is dropped before ``backward`` (``Trainer`` does),
    the N x N tensor is freed before the backward pass;
  * ``"none"``: with ``return_loss=True`` the two fields are None, so a training loop that keeps
    the output does not hold the N x N tensors through backward.  transformers' forward still
    computes them once (the similarities and their scaled copy, which autograd keeps for
    ``logit_scale``'s gradient); they are freed before the fused loss runs.

Importing this module imports transformers; ``import clip_fast`` never does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

import clip_fast
from clip_fast.core.checks import check_chunk_size
from clip_fast.core.registry import BACKENDS
from clip_fast.distributed import distributed_clip_loss
from clip_fast.siglip.distributed import DIST_IMPLS as SIGLIP_DIST_IMPLS
from clip_fast.siglip.distributed import distributed_siglip_loss

__all__ = ["FastLossOptions", "apply_fast_loss", "remove_fast_loss", "use_fast_hf_losses",
           "supported_models"]

# (module, class, loss kind): models whose ``return_loss`` is one of the two losses above,
# computed from the output's normalised embeddings and the model's ``logit_scale``
# (and ``logit_bias``).
_MODELS = (("transformers.models.clip.modeling_clip", "CLIPModel", "clip"),
           ("transformers.models.siglip.modeling_siglip", "SiglipModel", "siglip"),
           ("transformers.models.siglip2.modeling_siglip2", "Siglip2Model", "siglip"))

DISTRIBUTED = ("per_shard", "global")
LOGITS = ("keep", "none")
CLIP_DIST_IMPLS = ("gather", "ring")
_ORIGINAL = "_clip_fast_original_forward"  # the wrapper's attribute naming what it wraps
_OPTIONS = "_clip_fast_loss_options"  # an instance's own FastLossOptions (apply_fast_loss)
_DEFAULT = "_clip_fast_default_options"  # a wrapper's options for instances without their own
_INSTALLED = {}  # class -> the pass-through wrapper apply_fast_loss installed on it


@dataclasses.dataclass(frozen=True)
class FastLossOptions:
    """What the fused ``return_loss`` does (module doc); checked when built."""
    distributed: str = "per_shard"
    logits: str = "keep"
    clip_dist_impl: str = "gather"
    siglip_dist_impl: str = "bidir"
    backend: str = "auto"
    chunk_size: Optional[int] = None
    group: object = None  # a torch.distributed process group; None is the world

    def __post_init__(self):
        for name, allowed in (("distributed", DISTRIBUTED), ("logits", LOGITS),
                              ("clip_dist_impl", CLIP_DIST_IMPLS), ("siglip_dist_impl", SIGLIP_DIST_IMPLS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"clip_fast.integrations.transformers: {name} must be one of {allowed}, "
                                 f"got {value!r}")
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"clip_fast.integrations.transformers: backend must be one of "
                             f"{('auto',) + BACKENDS}, got {self.backend!r}")
        check_chunk_size(self.chunk_size)


def supported_models() -> Tuple[Tuple[type, str], ...]:
    """``(class, "clip" | "siglip")`` for every supported model class of this transformers."""
    return tuple((getattr(importlib.import_module(module), name), kind) for module, name, kind in _MODELS)


def _kind_of(model) -> str:
    for cls, kind in supported_models():
        if isinstance(model, cls):
            return kind
    names = ", ".join(name for _, name, _ in _MODELS)
    raise TypeError(f"clip_fast.integrations.transformers: apply_fast_loss got a {type(model).__name__}; "
                    f"supported models are {names} and their subclasses")


def _world(opts: FastLossOptions) -> Optional[Tuple[int, int]]:
    """``(rank, world_size)`` when the global loss applies: ``distributed="global"`` in an
    initialised group of more than one process; else None (the per-shard loss)."""
    if opts.distributed != "global" or not (dist.is_available() and dist.is_initialized()):
        return None
    world_size = dist.get_world_size(opts.group)
    return (dist.get_rank(opts.group), world_size) if world_size > 1 else None


def fused_loss(kind: str, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
               logit_bias: Optional[torch.Tensor], opts: FastLossOptions) -> torch.Tensor:
    """The model's ``return_loss`` from its normalised embeddings and raw (not exponentiated)
    ``logit_scale`` parameter (and SigLIP's ``logit_bias``), fused; on ``text_embeds``' device,
    as transformers computes it."""
    device = text_embeds.device
    img, scale = image_embeds.to(device), logit_scale.to(device).exp()
    world = _world(opts)
    common = dict(backend=opts.backend, chunk_size=opts.chunk_size)
    if kind == "clip":
        if world is None:
            return clip_fast.clip_loss(img, text_embeds, scale, **common)
        return distributed_clip_loss(img, text_embeds, scale, rank=world[0], world_size=world[1],
                                     local_loss=True, gather_with_grad=True, distributed=opts.clip_dist_impl,
                                     group=opts.group, **common)
    bias = logit_bias.to(device)
    if world is None:
        return clip_fast.siglip_loss(img, text_embeds, scale, bias, **common)
    return distributed_siglip_loss(img, text_embeds, scale, bias, rank=world[0], world_size=world[1],
                                   dist_impl=opts.siglip_dist_impl, group=opts.group, **common)


def _fields_for_loss(out, opts: FastLossOptions) -> dict:
    """The model output's fields (the logits dropped for ``logits="none"``), without ``loss``."""
    values = {f.name: getattr(out, f.name) for f in dataclasses.fields(out) if f.name != "loss"}
    if opts.logits == "none":
        values["logits_per_image"] = values["logits_per_text"] = None
    return values


def _fused_forward(original: Callable, kind: str, default: Optional[FastLossOptions]) -> Callable:
    """A ``forward(self, ...)`` with ``original``'s signature whose ``return_loss`` is fused
    with the instance's options (``apply_fast_loss``) or else ``default`` (the context
    manager's); with neither it is ``original``.

    ``original`` runs with ``return_loss=False`` and ``return_dict=True``; the tuple form is
    made here when the caller (or the config) asks for it, as transformers'
    ``can_return_tuple`` does.  The options live on the instance, not in a bound method, so
    copies of the model (``copy.deepcopy``, ``nn.DataParallel``'s replicas) use their own
    parameters."""
    names = list(inspect.signature(original).parameters)
    slot = names.index("return_loss") - 1  # its place among the positional arguments after self

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        opts = self.__dict__.get(_OPTIONS, default)
        positional = len(args) > slot
        return_loss = args[slot] if positional else kwargs.get("return_loss")
        if opts is None or not return_loss:
            return original(self, *args, **kwargs)
        if positional:
            args = args[:slot] + (False,) + args[slot + 1:]
        else:
            kwargs["return_loss"] = False
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(getattr(self, "config", None), "return_dict", True)
        out = original(self, *args, return_dict=True, **kwargs)
        output_type, values = type(out), _fields_for_loss(out, opts)
        del out  # with logits="none" the N x N logits (and their graph) are freed before the loss
        loss = fused_loss(kind, values["image_embeds"], values["text_embeds"], self.logit_scale,
                          getattr(self, "logit_bias", None), opts)
        out = output_type(loss=loss, **values)
        return out if return_dict else out.to_tuple()

    setattr(forward, _ORIGINAL, original)
    setattr(forward, _DEFAULT, default)
    return forward


def _unwrapped(forward: Callable) -> Callable:
    while hasattr(forward, _ORIGINAL):
        forward = getattr(forward, _ORIGINAL)
    return forward


@contextlib.contextmanager
def use_fast_hf_losses(**options) -> Iterator[FastLossOptions]:
    """Inside the block, every supported model class (``supported_models()``, subclasses that
    do not override ``forward`` included) computes ``return_loss`` fused; the classes'
    ``forward`` are put back on exit.  ``options`` are :class:`FastLossOptions`' fields; the
    block yields them.  An instance given its own options by :func:`apply_fast_loss` keeps them."""
    opts = FastLossOptions(**options)
    patched = []
    try:
        for cls, kind in supported_models():
            current = cls.__dict__["forward"]
            cls.forward = _fused_forward(_unwrapped(current), kind, opts)
            patched.append((cls, current))
        yield opts
    finally:
        for cls, current in reversed(patched):
            # an enclosing block's wrapper, else apply_fast_loss's pass-through if one was
            # installed meanwhile, else the class's own forward
            outer = getattr(current, _DEFAULT, None) is not None
            cls.forward = current if outer else _INSTALLED.get(cls, current)


def _defining_class(model, kind: str) -> type:
    """The supported class whose ``forward`` this model runs, or an error naming the override."""
    for cls, _ in supported_models():
        if isinstance(model, cls):
            owner = next(c for c in type(model).__mro__ if "forward" in c.__dict__)
            if owner is not cls:
                raise TypeError(f"clip_fast.integrations.transformers: {type(model).__name__} overrides "
                                f"{cls.__name__}.forward; apply_fast_loss patches only {cls.__name__}'s own")
            return cls
    raise AssertionError(kind)  # _kind_of found a supported class


def apply_fast_loss(model, **options):
    """Make this one model instance compute ``return_loss`` fused (``options`` as in
    :class:`FastLossOptions`); returns the model.  Applying again replaces the options;
    :func:`remove_fast_loss` undoes it.

    The options are stored on the instance; the model's class gets (once, for the rest of
    the process) a ``forward`` that reads them and, for an instance without options, is the
    class's own: other instances are unchanged."""
    kind = _kind_of(model)
    cls = _defining_class(model, kind)
    opts = FastLossOptions(**options)
    if cls not in _INSTALLED:
        _INSTALLED[cls] = _fused_forward(_unwrapped(cls.__dict__["forward"]), kind, None)
        if not hasattr(cls.__dict__["forward"], _ORIGINAL):  # inside a block, installed on its exit
            cls.forward = _INSTALLED[cls]
    model.__dict__[_OPTIONS] = opts
    return model


def remove_fast_loss(model):
    """Undo :func:`apply_fast_loss` on ``model`` (nothing happens if it was not applied); returns it."""
    model.__dict__.pop(_OPTIONS, None)
    return model
