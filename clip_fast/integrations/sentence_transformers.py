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

Every other option is a union of blocks (``clip_fast.clip.blocks``: one log-sum-exp per
anchor over several sweeps, each block a sweep of the backend contract):

- ``"query_to_query"``: the block (queries, all queries) whose diagonal (the query itself)
  is masked: the off-diagonal sweep, its diagonal never added back.
- ``"doc_to_query"``: (positives, all queries), diagonal included.
- ``"doc_to_doc"``: (positives, every document column) with each diagonal (the row's own
  positive and own hard negatives) masked.
- ``partition_mode="joint"``: one log-sum-exp per anchor over all those blocks
  (``logaddexp`` of the blocks' row log-sum-exp); ``"per_direction"``: one per direction,
  averaged, the positive the target of each.
- ``hardness_mode`` with strength h: the library adds ``h * sim.detach()`` to the chosen
  ``query_to_doc`` logits, so those logits are ``(scale + h) * sim`` with derivative
  ``scale``.  Its three modes pick which entries: ``"in_batch_negatives"`` every
  off-diagonal entry (not the positive, not the row's own hard negatives),
  ``"hard_negatives"`` only the row's own hard negatives (the diagonals of the negative
  blocks), ``"all_negatives"`` everything but the positive.  A block is swept at its
  off-diagonal's softmax scale, its diagonal added back at its own scale, and its
  gradient taken at the scale times ``scale / (scale + h)``.

The gather of these options is clip_fast's (every rank's rows, this rank's first, so that row
i's own documents are column i of every block, and the backward a reduce-scatter, as the
library's ``all_gather`` does), with a check that all ranks send alike columns; shards of
unequal length take their real offsets.

Only a ``similarity_fct`` other than ``cos_sim`` and ``dot_score`` raises
:class:`UnsupportedByClipFast`: any other function is not a scaled dot product, so no
sweep computes it (at construction, and again at each call for an attribute changed later).

Importing this module imports sentence_transformers; ``import clip_fast`` never does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sentence_transformers import util as st_util
from sentence_transformers.sentence_transformer.losses.cached_multiple_negatives_ranking import (
    CachedMultipleNegativesRankingLoss)
from sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking import (
    MultipleNegativesRankingLoss)

import clip_fast
from clip_fast.clip.blocks import Block, block_softmax_loss
from clip_fast.core.collectives import all_gather_rows, reduce_scatter_rows
from clip_fast.distributed import distributed_clip_loss

__all__ = ["FastMultipleNegativesRankingLoss", "FastCachedMultipleNegativesRankingLoss",
           "FastMultipleNegativesSymmetricRankingLoss", "FastCachedMultipleNegativesSymmetricRankingLoss",
           "UnsupportedByClipFast", "mnrl_block_loss", "mnrl_loss", "use_fast_st_losses"]

_SYMMETRIC = ("query_to_doc", "doc_to_query")
_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


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


def _direction_weight(directions: Sequence[str], partition_mode: str) -> Optional[float]:
    """clip_fast's ``image_to_text_weight`` when these directions are a CLIP loss, else None
    (the block form of :func:`mnrl_block_loss`)."""
    chosen = set(directions)
    if chosen == {"query_to_doc"}:
        return 1.0  # one direction: "joint" and "per_direction" are the same softmax
    if chosen == set(_SYMMETRIC) and partition_mode == "per_direction":
        return 0.5
    return None


def _hardness(loss) -> float:
    """The penalty's strength h, 0 when off (no mode, or strength 0)."""
    return float(loss.hardness_strength) if loss.hardness_mode is not None else 0.0


def _check_fusable(loss) -> tuple:
    """``(normalise, image_to_text_weight or None)`` for an MNRL's options, or a refusal."""
    weight = _direction_weight(loss.directions, loss.partition_mode)
    return _normalises(loss.similarity_fct), (weight if _hardness(loss) == 0.0 else None)


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


@dataclasses.dataclass(frozen=True)
class _Layout:
    """This rank's place and every rank's row count (a ``clip_fast.core.distributed.RankLayout``)."""
    rank: int
    world_size: int
    sizes: Tuple[int, ...]
    group: Optional[object] = None
    nccl: bool = False

    @property
    def offsets(self) -> Tuple[int, ...]:
        return tuple(sum(self.sizes[:q]) for q in range(self.world_size))


def _agree_columns(embeddings: List[torch.Tensor], rank: int, world_size: int) -> _Layout:
    """Every rank's (rows, dim, columns, dtype) all-gathered: a rank whose columns differ from
    another's in anything but the row count makes every rank raise the same error, instead
    of a gather that hangs or fails on some ranks only."""
    nccl = str(dist.get_backend()).lower() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    e = embeddings[0]
    shapes_ok = all(c.dim() == 2 and c.shape == e.shape and c.dtype == e.dtype for c in embeddings)
    mine = torch.tensor([e.shape[0], e.shape[-1], len(embeddings), _DTYPES.index(e.dtype) if e.dtype in _DTYPES
                         else -1, int(shapes_ok)], dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(rows, mine)
    table = torch.stack(rows).cpu()
    if not bool((table[:, 1:] == table[0, 1:]).all()) or not bool(table[:, 4].all()):
        raise ValueError("clip_fast.integrations.sentence_transformers: gather_across_devices needs, on every "
                         "rank, columns of one shape (n, dim) and dtype, with the same dim, column count and "
                         f"dtype on every rank; (rows, dim, columns, dtype, columns alike) per rank: {table.tolist()}")
    return _Layout(rank, world_size, tuple(int(r) for r in table[:, 0]), nccl=nccl)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _GatherRows(torch.autograd.Function):
    """Every rank's rows, this rank's first (``all_gather_rows(rotate=True)``, unequal counts
    allowed); the backward sums every rank's gradient and keeps this rank's rows, as
    ``torch.distributed.nn.all_gather`` (the library's gather) does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: _Layout) -> torch.Tensor:
        ctx.layout = layout
        return all_gather_rows(x, layout, rotate=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return reduce_scatter_rows(grad.contiguous().clone(), ctx.layout, rotated=True), None


def mnrl_blocks(directions: Sequence[str], partition_mode: str, scale: float, hardness_mode: Optional[str],
                hardness_strength: float, n_negatives: int) -> Tuple[List[Block], List[float]]:
    """MNRL's softmax as blocks of ``clip_fast.clip.blocks`` over the features
    ``[local queries, local positives, queries, positives, negatives_1, ..]``, where row i's
    own query and documents are row i of the candidates.  See the module doc."""
    s, h = float(scale), float(hardness_strength) if hardness_mode is not None else 0.0
    off = s + h if hardness_mode in ("in_batch_negatives", "all_negatives") else s
    neg_diag = s + h if hardness_mode in ("hard_negatives", "all_negatives") else s
    per_direction = partition_mode == "per_direction"
    negs = range(4, 4 + n_negatives)
    part = {d: (i if per_direction else 0) for i, d in enumerate(d for d in _DIRECTIONS if d in directions)}
    blocks = {"query_to_doc": [Block(0, 3, off, s, s, positive=True)]
              + [Block(0, m, off, neg_diag, s) for m in negs],
              "query_to_query": [Block(0, 2, s, None, s)],
              "doc_to_query": [Block(1, 2, s, s, s, positive=per_direction)],
              "doc_to_doc": [Block(1, y, s, None, s) for y in (3, *negs)]}
    out = [dataclasses.replace(b, partition=part[d]) for d in part for b in blocks[d]]
    weights = [1.0 / len(part)] * len(part) if per_direction else [1.0]
    return out, weights


def mnrl_block_loss(embeddings: List[torch.Tensor], scale: float, *, normalise: bool = True,
                    directions: Sequence[str] = ("query_to_doc",), partition_mode: str = "joint",
                    hardness_mode: Optional[str] = None, hardness_strength: float = 0.0,
                    gather_across_devices: bool = False, backend: str = "auto",
                    chunk_size: Optional[int] = None) -> torch.Tensor:
    """MNRL's loss with every option, as sweeps of ``clip_fast.clip.blocks``.  With
    ``gather_across_devices`` every rank's columns are gathered with their gradients, as the
    library gathers them (shards of unequal length too, at their real offsets)."""
    if len(embeddings) < 2:
        raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
    if normalise:
        embeddings = [F.normalize(e, p=2, dim=-1) for e in embeddings]
    n = embeddings[0].shape[0]
    world = _world() if gather_across_devices else None
    if world is not None:
        layout = _agree_columns(embeddings, *world)
        embeddings = [_GatherRows.apply(e, layout) for e in embeddings]
    # Rows in rank order starting at this rank's (the gather's rotation): row i's own
    # document is column i of every candidate block, where the blocks keep their diagonal.
    queries, docs = embeddings[0], embeddings[1:]
    feats = [queries[:n], docs[0][:n], queries, *docs]
    blocks, weights = mnrl_blocks(directions, partition_mode, scale, hardness_mode, hardness_strength,
                                  len(docs) - 1)
    return block_softmax_loss(feats, blocks, weights, backend=backend, chunk_size=chunk_size)


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
        if weight is None:
            return mnrl_block_loss(list(embeddings), self.scale, normalise=normalise,
                                   directions=self.directions, partition_mode=self.partition_mode,
                                   hardness_mode=self.hardness_mode, hardness_strength=self.hardness_strength,
                                   gather_across_devices=self.gather_across_devices, backend=self.backend,
                                   chunk_size=self.chunk_size)
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
