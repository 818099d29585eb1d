"""``FastMatryoshkaLoss`` around the fused MNRL twins against sentence-transformers' own
``MatryoshkaLoss`` around its MNRL (and cached MNRL), on a tiny BERT in float64 (dropout on,
the same masks for both): the loss and every parameter gradient within a relative 1e-9, with
sizes that are not multiples of anything (16, 9, 3 of D = 16), hard-negative columns, the
fused options, per-size weights and ``n_dims_per_step`` (the same ``random`` state)."""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("sentence_transformers", reason="the sentence-transformers extra is not installed")

from sentence_transformers import util  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402

from clip_fast.integrations import matryoshka_st  # noqa: E402
from clip_fast.integrations.sentence_transformers import (  # noqa: E402
    FastCachedMultipleNegativesRankingLoss, FastMultipleNegativesRankingLoss)
# The tiny BERT fixture, its token columns and the 1e-9 comparison of the MNRL twins' tests.
from test_sentence_transformers import _assert_same, _columns, tiny  # noqa: E402,F401

DIMS = (9, 16, 3)
SYMMETRIC = ("query_to_doc", "doc_to_query")
CASES = [("default", dict(), None, -1, 1),
         ("symmetric_weights", dict(directions=SYMMETRIC, partition_mode="per_direction"), (1.0, 0.5, 2.0), -1, 0),
         ("dot_two_per_step", dict(similarity_fct=util.dot_score, scale=1.0), None, 2, 2)]


def _run(model, loss_fn, features, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both losses
    random.seed(seed)        # the same sizes drawn by n_dims_per_step
    loss = loss_fn(features, None)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,opts,weights,per_step,k", CASES, ids=[c[0] for c in CASES])
def test_matches_library_matryoshka_mnrl(tiny, name, opts, weights, per_step, k):
    tiny.train()
    features = _columns(tiny, 9, k, seed=k)
    lib = st_losses.MatryoshkaLoss(tiny, st_losses.MultipleNegativesRankingLoss(tiny, **opts), DIMS,
                                   weights, n_dims_per_step=per_step)
    fast = matryoshka_st.FastMatryoshkaLoss(tiny, FastMultipleNegativesRankingLoss(tiny, **opts), DIMS,
                                            weights, n_dims_per_step=per_step)
    for seed in (5, 6):
        _assert_same(_run(tiny, fast, features, seed), _run(tiny, lib, features, seed), f"{name} seed {seed}")
    # The configuration is the library's (its "loss" entry names the inner twin's class).
    assert {k: v for k, v in fast.get_config_dict().items() if k != "loss"} == \
        {k: v for k, v in lib.get_config_dict().items() if k != "loss"}


@pytest.mark.parametrize("name,opts,weights,per_step,k", CASES, ids=[c[0] for c in CASES])
def test_matches_library_matryoshka_cached_mnrl(tiny, name, opts, weights, per_step, k):
    tiny.train()
    features = _columns(tiny, 9, k, seed=10 + k)
    lib = st_losses.MatryoshkaLoss(
        tiny, st_losses.CachedMultipleNegativesRankingLoss(tiny, mini_batch_size=4, **opts), DIMS, weights,
        n_dims_per_step=per_step)
    fast = matryoshka_st.FastMatryoshkaLoss(
        tiny, FastCachedMultipleNegativesRankingLoss(tiny, mini_batch_size=4, **opts), DIMS, weights,
        n_dims_per_step=per_step)
    _assert_same(_run(tiny, fast, features, 3), _run(tiny, lib, features, 3), name)


def test_the_nested_path_is_taken(tiny, monkeypatch):
    """The fused MNRL's per-size stage is not called: one nested call serves every size."""
    calls = []
    monkeypatch.setattr(matryoshka_st.clip_fast, "clip_loss",
                        lambda *a, **kw: calls.append(kw["matryoshka_dims"]) or torch.zeros((), requires_grad=True))
    fast = matryoshka_st.FastMatryoshkaLoss(tiny, FastMultipleNegativesRankingLoss(tiny), DIMS)
    fast(_columns(tiny, 5, 0, seed=1), None)
    assert calls == [(16, 9, 3)]


def test_other_losses_keep_the_library_path(tiny):
    """Around a loss that is not a fused twin it is the library's MatryoshkaLoss."""
    tiny.eval()
    features = _columns(tiny, 6, 0, seed=2)
    inner = st_losses.MultipleNegativesRankingLoss(tiny)
    fast = matryoshka_st.FastMatryoshkaLoss(tiny, inner, DIMS)
    lib = st_losses.MatryoshkaLoss(tiny, inner, DIMS)
    assert not fast.fused
    assert torch.equal(fast(features, None), lib(features, None))
