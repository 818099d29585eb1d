"""sentence-transformers' ``MatryoshkaLoss`` around the fused MNRL, every size in one sweep.

    from clip_fast.integrations.matryoshka_st import FastMatryoshkaLoss
    from clip_fast.integrations.sentence_transformers import FastMultipleNegativesRankingLoss
    loss = FastMatryoshkaLoss(model, FastMultipleNegativesRankingLoss(model), [768, 512, 256, 128, 64])

``FastMatryoshkaLoss`` takes the library's constructor and keeps its configuration; around
``FastMultipleNegativesRankingLoss`` or ``FastCachedMultipleNegativesRankingLoss`` (and the
symmetric twins) its loss stage is one call of ``clip_fast.clip_loss`` with
``matryoshka_dims`` instead of one loss per size.  What the library computes is kept:

* each size's embeddings are the prefix, L2-normalised (the library's ``shrink`` always
  normalises; a ``cos_sim`` MNRL normalising again changes nothing), so
  ``matryoshka_renormalize=True``;
* ``n_dims_per_step``: the same ``random.sample`` over the library's (descending) sizes, so
  under one ``random`` state both pick the same sizes;
* the cached loss: the library decorates ``calculate_loss`` to loop over the sizes on the
  cached embeddings; here the decoration is one nested call, whose backward fills the cached
  embeddings' gradients for the replay.

Around any other loss, and with ``gather_across_devices`` on more than one process (the
nested sweep runs in one process), it is the library's ``MatryoshkaLoss`` unchanged.
Importing this module imports sentence_transformers; ``import clip_fast`` never does.
"""
from __future__ import annotations

import random
from typing import List, Sequence, Tuple

import torch
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses.matryoshka import MatryoshkaLoss

import clip_fast
from clip_fast.integrations.sentence_transformers import (FastCachedMultipleNegativesRankingLoss,
                                                         FastMultipleNegativesRankingLoss, _check_fusable,
                                                         _world)

__all__ = ["FastMatryoshkaLoss", "nested_mnrl_loss"]


def nested_mnrl_loss(mnrl, embeddings: List[torch.Tensor], dims: Sequence[int],
                     weights: Sequence[float]) -> torch.Tensor:
    """sum_k weights[k] * MNRL(``mnrl``'s options) on every column's first dims[k] dimensions,
    L2-normalised, from ``[anchors, positives, negatives_1, ..]`` (each (n, D)): one sweep."""
    if len(embeddings) < 2:
        raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
    _, weight = _check_fusable(mnrl)
    negatives = torch.cat(embeddings[2:], dim=0) if len(embeddings) > 2 else None
    return clip_fast.clip_loss(embeddings[0], embeddings[1], mnrl.scale, image_to_text_weight=weight,
                               negative_text_features=negatives, backend=mnrl.backend,
                               chunk_size=mnrl.chunk_size, matryoshka_dims=tuple(dims),
                               matryoshka_weights=tuple(float(w) for w in weights))


class FastMatryoshkaLoss(MatryoshkaLoss):
    """sentence-transformers' ``MatryoshkaLoss``; around the fused MNRL twins, one sweep for
    every size (see the module doc)."""

    def __init__(self, model, loss, matryoshka_dims: Sequence[int], matryoshka_weights=None,
                 n_dims_per_step: int = -1):
        super().__init__(model, loss, matryoshka_dims, matryoshka_weights, n_dims_per_step)
        self.fused = isinstance(loss, (FastMultipleNegativesRankingLoss, FastCachedMultipleNegativesRankingLoss))
        if isinstance(loss, FastCachedMultipleNegativesRankingLoss):
            # The library's decoration loops over the sizes; this stage replaces it.
            loss.calculate_loss = _NestedCachedStage(self, loss)

    def step_sizes(self, sort: bool) -> Tuple[Tuple[int, ...], Tuple[float, ...]]:
        """This step's sizes and weights, drawn as the library draws them (``sort``: the plain
        loss sorts the drawn indices, the cached one does not)."""
        indices = range(len(self.matryoshka_dims))
        if 0 < self.n_dims_per_step < len(indices):
            indices = random.sample(indices, self.n_dims_per_step)
            if sort:
                indices.sort()
        return (tuple(self.matryoshka_dims[i] for i in indices),
                tuple(self.matryoshka_weights[i] for i in indices))

    def forward(self, sentence_features, labels):
        if not self.fused or self.uses_gradient_cache or (self.loss.gather_across_devices and _world()):
            return super().forward(sentence_features, labels)
        dims, weights = self.step_sizes(sort=True)
        return nested_mnrl_loss(self.loss, embed_columns(self.model, sentence_features), dims, weights)


class _NestedCachedStage:
    """The cached MNRL's ``calculate_loss`` for every size at once (``with_backward``: the
    loss is backpropagated into the cached embeddings, as the library's stage does)."""

    def __init__(self, owner: FastMatryoshkaLoss, loss: FastCachedMultipleNegativesRankingLoss):
        self.owner, self.fallback = owner, loss.calculate_loss
        self.mnrl = loss.loss

    def __call__(self, reps: List[List[torch.Tensor]], labels=None, *, with_backward: bool = False):
        if self.mnrl.gather_across_devices and _world():
            return self.fallback(reps, labels, with_backward=with_backward)
        dims, weights = self.owner.step_sizes(sort=False)
        loss = nested_mnrl_loss(self.mnrl, [torch.cat(column) for column in reps], dims, weights)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss
