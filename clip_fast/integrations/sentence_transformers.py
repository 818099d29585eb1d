"""sentence-transformers' MultipleNegativesRankingLoss (MNRL) and its cached form on clip_fast.

    from clip_fast.integrations.sentence_transformers import use_fast_st_losses
    with use_fast_st_losses():
        loss = sentence_transformers.losses.MultipleNegativesRankingLoss(model)   # the fused twin

or build the twins by name: ``FastMultipleNegativesRankingLoss(model, ...)`` and
``FastCachedMultipleNegativesRankingLoss(model, mini_batch_size=..., ...)`` take the library's
constructor arguments and keep its ``forward``, embedding stages and ``get_config_dict``
(they subclass the library's classes); only the loss stage changes.

The loss stage.  With anchors ``Q`` (n, D), positives ``P`` and hard-negative columns
``N_1 .. N_k``, MNRL's default (``directions=("query_to_doc",)``) is, per anchor i,
``CE(scale * sim(Q_i, [P; N_1; ..; N_k]), i)`` averaged over i: clip_fast's row direction
(``image_to_text_weight=1``) with ``[N_1; ..; N_k]`` as ``negative_text_features``.  Adding
``"doc_to_query"`` with ``partition_mode="per_direction"`` averages that with
``CE(scale * sim(P_i, Q), i)``: clip_fast's column direction, so ``image_to_text_weight=0.5``.
``cos_sim`` is ``dot_score`` on L2-normalised rows (the library normalises the same way).
The softmax over a column set does not depend on its order, so the library's column order
(every positive, then every first negative, ...) needs no copy here.

``gather_across_devices``: the library gathers every rank's anchors and candidates with
``torch.distributed.nn.all_gather`` and averages its local rows' loss; that is clip_fast's
``distributed_clip_loss(local_loss=True, gather_with_grad=True)``, whose softmaxes hold every
rank's positives and hard negatives and whose gradients reach each row's owner.

Options the fused loss cannot express exactly raise :class:`UnsupportedByClipFast` naming
the option (at construction, and again at each call for attributes changed later):
``"query_to_query"`` and ``"doc_to_doc"`` (their self and own-document masks differ per row),
``partition_mode="joint"`` with more than one direction (one softmax over a row and a
column of S), ``hardness_mode`` with ``hardness_strength > 0`` (a per-entry logit offset)
and any ``similarity_fct`` other than ``cos_sim`` and ``dot_score``.

Importing this module imports sentence_transformers; ``import clip_fast`` never does.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sentence_transformers import util as st_util
from sentence_transformers.sentence_transformer.losses.cached_multiple_negatives_ranking import (
    CachedMultipleNegativesRankingLoss)
from sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking import (
    MultipleNegativesRankingLoss)

import clip_fast
from clip_fast.distributed import distributed_clip_loss

__all__ = ["FastMultipleNegativesRankingLoss", "FastCachedMultipleNegativesRankingLoss",
           "FastMultipleNegativesSymmetricRankingLoss", "FastCachedMultipleNegativesSymmetricRankingLoss",
           "UnsupportedByClipFast", "mnrl_loss", "use_fast_st_losses"]

_SYMMETRIC = ("query_to_doc", "doc_to_query")


class UnsupportedByClipFast(NotImplementedError):
    """An MNRL option that clip_fast's fused loss does not compute exactly."""


def _refuse(option: str, why: str) -> None:
    raise UnsupportedByClipFast(
        f"clip_fast.integrations.sentence_transformers: {option} is not fused: {why}. Use "
        "sentence_transformers' own MultipleNegativesRankingLoss for this option.")


def _normalises(similarity_fct) -> bool:
    """True for ``cos_sim``, False for ``dot_score``; any other function is refused."""
    if similarity_fct is st_util.cos_sim:
        return True
    if similarity_fct is st_util.dot_score:
        return False
    _refuse(f"similarity_fct={st_util.similarity_fct_name(similarity_fct)!r}",
            "only sentence_transformers.util.cos_sim and dot_score are")


def _direction_weight(directions: Sequence[str], partition_mode: str) -> float:
    """clip_fast's ``image_to_text_weight`` for these directions, or a refusal naming them."""
    chosen = set(directions)
    for masked in ("query_to_query", "doc_to_doc"):
        if masked in chosen:
            _refuse(f"directions containing {masked!r}", "its masked same-type block is not a "
                    "sweep of clip_fast's loss")
    if chosen == {"query_to_doc"}:
        return 1.0  # one direction: "joint" and "per_direction" are the same softmax
    if chosen == set(_SYMMETRIC) and partition_mode == "per_direction":
        return 0.5
    _refuse(f"directions={tuple(directions)!r} with partition_mode={partition_mode!r}",
            "a joint softmax over a row and a column of S is not a clip_fast loss "
            "(partition_mode='per_direction' is)")


def _check_fusable(loss) -> tuple:
    """``(normalise, image_to_text_weight)`` for an MNRL's options, or a refusal."""
    if loss.hardness_mode is not None and loss.hardness_strength > 0.0:
        _refuse(f"hardness_mode={loss.hardness_mode!r} with hardness_strength > 0",
                "its penalty is a per-entry logit offset without gradient")
    return _normalises(loss.similarity_fct), _direction_weight(loss.directions, loss.partition_mode)


def _world() -> Optional[tuple]:
    """``(rank, world_size)`` of an initialised group of more than one process, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def mnrl_loss(embeddings: List[torch.Tensor], scale: float, *, normalise: bool = True,
              image_to_text_weight: float = 1.0, gather_across_devices: bool = False,
              backend: str = "auto", chunk_size: Optional[int] = None) -> torch.Tensor:
    """MNRL's loss of ``[anchors, positives, negatives_1, ..]`` (each (n, D)), fused.

    ``image_to_text_weight`` is 1 for ``("query_to_doc",)`` and 0.5 for the symmetric
    per-direction loss (see the module doc); ``normalise`` is ``cos_sim``.
    """
    if len(embeddings) < 2:
        raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
    if normalise:
        embeddings = [F.normalize(e, p=2, dim=-1) for e in embeddings]
    queries, positives = embeddings[0], embeddings[1]
    negatives = torch.cat(embeddings[2:], dim=0) if len(embeddings) > 2 else None
    world = _world() if gather_across_devices else None
    if world is None:
        return clip_fast.clip_loss(queries, positives, scale, image_to_text_weight=image_to_text_weight,
                                   negative_text_features=negatives, backend=backend, chunk_size=chunk_size)
    return distributed_clip_loss(queries, positives, scale, rank=world[0], world_size=world[1],
                                 local_loss=True, gather_with_grad=True, mode="gather",
                                 image_to_text_weight=image_to_text_weight,
                                 negative_text_features=negatives, backend=backend, chunk_size=chunk_size)


class FastMultipleNegativesRankingLoss(MultipleNegativesRankingLoss):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` with the loss stage fused.

    Same constructor (plus ``backend`` and ``chunk_size``, passed to ``clip_fast.clip_loss``),
    ``forward``, ``get_config_dict`` and loss; options that are not fused raise
    :class:`UnsupportedByClipFast` (see the module doc).
    """

    def __init__(self, model, *args, backend: str = "auto", chunk_size: Optional[int] = None, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.backend = backend
        self.chunk_size = chunk_size
        _check_fusable(self)

    def compute_loss_from_embeddings(self, embeddings: List[torch.Tensor], labels=None) -> torch.Tensor:
        normalise, weight = _check_fusable(self)
        return mnrl_loss(list(embeddings), self.scale, normalise=normalise, image_to_text_weight=weight,
                         gather_across_devices=self.gather_across_devices, backend=self.backend,
                         chunk_size=self.chunk_size)


class FastCachedMultipleNegativesRankingLoss(CachedMultipleNegativesRankingLoss):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` with the loss stage fused.

    The embedding stages are the library's (``CachedLossMixin``: mini-batches without
    gradient, random states captured and restored for the replay, so dropout masks match);
    the loss stage is one fused call on the whole batch's embeddings instead of a loop over
    row chunks of (mini-batch x all candidates) logits.
    """

    def __init__(self, model, *args, backend: str = "auto", chunk_size: Optional[int] = None, **kwargs):
        super().__init__(model, *args, **kwargs)
        lib = self.loss
        self.loss = FastMultipleNegativesRankingLoss(
            model, scale=lib.scale, similarity_fct=lib.similarity_fct,
            gather_across_devices=lib.gather_across_devices, directions=lib.directions,
            partition_mode=lib.partition_mode, hardness_mode=lib.hardness_mode,
            hardness_strength=lib.hardness_strength, backend=backend, chunk_size=chunk_size)

    def calculate_loss(self, reps: List[List[torch.Tensor]], labels=None, *,
                       with_backward: bool = False) -> torch.Tensor:
        embeddings = [torch.cat(column) for column in reps]
        loss = self.loss.compute_loss_from_embeddings(embeddings, labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss


class FastMultipleNegativesSymmetricRankingLoss(FastMultipleNegativesRankingLoss):
    """The deprecated ``MultipleNegativesSymmetricRankingLoss``: the fused MNRL with
    ``directions=("query_to_doc", "doc_to_query")`` and ``partition_mode="per_direction"``,
    which is what the library's class passes to MNRL."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=st_util.cos_sim,
                 gather_across_devices: bool = False, *, backend: str = "auto",
                 chunk_size: Optional[int] = None):
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         gather_across_devices=gather_across_devices, directions=_SYMMETRIC,
                         partition_mode="per_direction", backend=backend, chunk_size=chunk_size)


class FastCachedMultipleNegativesSymmetricRankingLoss(FastCachedMultipleNegativesRankingLoss):
    """The deprecated ``CachedMultipleNegativesSymmetricRankingLoss``: the fused cached MNRL
    with the symmetric per-direction options, as the library's class passes them."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=st_util.cos_sim,
                 mini_batch_size: int = 32, mini_batch_num_tokens: Optional[int] = None,
                 gather_across_devices: bool = False, show_progress_bar: bool = False, *,
                 backend: str = "auto", chunk_size: Optional[int] = None):
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         mini_batch_size=mini_batch_size, mini_batch_num_tokens=mini_batch_num_tokens,
                         gather_across_devices=gather_across_devices, directions=_SYMMETRIC,
                         partition_mode="per_direction", show_progress_bar=show_progress_bar,
                         backend=backend, chunk_size=chunk_size)


def _originals() -> dict:
    """The library's four classes by name (the deprecated ones imported here only, so that
    their deprecation warning fires where the library's own code imports them)."""
    from sentence_transformers.sentence_transformer.losses import (
        cached_multiple_negatives_symmetric_ranking as cached_sym)
    from sentence_transformers.sentence_transformer.losses import multiple_negatives_symmetric_ranking as sym

    return {"MultipleNegativesRankingLoss": MultipleNegativesRankingLoss,
            "CachedMultipleNegativesRankingLoss": CachedMultipleNegativesRankingLoss,
            "MultipleNegativesSymmetricRankingLoss": sym.MultipleNegativesSymmetricRankingLoss,
            "CachedMultipleNegativesSymmetricRankingLoss": cached_sym.CachedMultipleNegativesSymmetricRankingLoss}


_TWINS = {"MultipleNegativesRankingLoss": FastMultipleNegativesRankingLoss,
          "CachedMultipleNegativesRankingLoss": FastCachedMultipleNegativesRankingLoss,
          "MultipleNegativesSymmetricRankingLoss": FastMultipleNegativesSymmetricRankingLoss,
          "CachedMultipleNegativesSymmetricRankingLoss": FastCachedMultipleNegativesSymmetricRankingLoss}


@contextlib.contextmanager
def use_fast_st_losses() -> Iterator[None]:
    """Inside the block, sentence-transformers' MNRL classes (and the cached and deprecated
    symmetric ones) are the fused twins under every module that binds them: code that
    builds ``losses.MultipleNegativesRankingLoss(model, ...)`` gets the twin.  The originals
    are put back on exit.  Loss objects built inside keep working after the block."""
    originals = _originals()
    patched = []
    for module in [m for name, m in list(sys.modules.items())
                   if m is not None and name.split(".")[0] == "sentence_transformers"]:
        for name, cls in originals.items():
            if getattr(module, name, None) is cls:
                setattr(module, name, _TWINS[name])
                patched.append((module, name, cls))
    try:
        yield
    finally:
        for module, name, cls in patched:
            setattr(module, name, cls)
