"""The fused MultipleNegativesRankingLoss twins against sentence-transformers' own losses.

Loss and every embedding gradient (anchors, positives, each hard-negative column) of the
library's ``MultipleNegativesRankingLoss`` and of ``FastMultipleNegativesRankingLoss``, on
odd batch sizes with 0, 1 and 3 hard-negative columns, for every fused option: in float64
within a relative 1e-9, in float32 within the precision rule (``helpers.seed_ratio``).
The cached twin against the library's cached loss on a tiny BERT (parameter gradients,
dropout on), the options that are refused, and the switch.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("sentence_transformers", reason="the sentence-transformers extra is not installed")

from sentence_transformers import util  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402

from helpers import DTYPE_UNIT, PRECISION_FACTOR, seed_ratio  # noqa: E402
from clip_fast.integrations.sentence_transformers import (  # noqa: E402
    FastCachedMultipleNegativesRankingLoss, FastMultipleNegativesRankingLoss, UnsupportedByClipFast,
    use_fast_st_losses)

SYMMETRIC = ("query_to_doc", "doc_to_query")
ALL_FOUR = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
# (name, constructor options): every option the twin fuses; hardness_mode with strength 0
# is the library's no-op and must stay one.
OPTIONS = [
    ("default", dict()),
    ("per_direction", dict(partition_mode="per_direction")),
    ("symmetric", dict(directions=SYMMETRIC, partition_mode="per_direction")),
    ("dot", dict(similarity_fct=util.dot_score, scale=1.0)),
    ("dot_symmetric", dict(similarity_fct=util.dot_score, scale=0.5, directions=SYMMETRIC,
                           partition_mode="per_direction")),
    ("scale50", dict(scale=50.0)),
    ("hardness_off", dict(hardness_mode="hard_negatives", hardness_strength=0.0)),
    # The block forms (clip_fast.clip.blocks): masked self-blocks, joint softmaxes, hardness.
    ("joint_symmetric", dict(directions=SYMMETRIC, partition_mode="joint")),
    ("query_to_query", dict(directions=("query_to_doc", "query_to_query"))),
    ("doc_to_doc", dict(directions=("query_to_doc", "doc_to_doc"))),
    ("all_four", dict(directions=ALL_FOUR)),
    ("all_four_scale100", dict(directions=ALL_FOUR, scale=100.0)),
    ("all_four_dot", dict(directions=ALL_FOUR, similarity_fct=util.dot_score, scale=0.7)),
    ("in_batch_negatives", dict(hardness_mode="in_batch_negatives", hardness_strength=9.0)),
    ("hard_negatives", dict(hardness_mode="hard_negatives", hardness_strength=5.0)),
    ("all_negatives", dict(hardness_mode="all_negatives", hardness_strength=1.0)),
    ("all_negatives_dot", dict(hardness_mode="all_negatives", hardness_strength=0.5,
                               similarity_fct=util.dot_score, scale=1.0)),
    ("hard_negatives_symmetric", dict(hardness_mode="hard_negatives", hardness_strength=5.0,
                                      directions=SYMMETRIC, partition_mode="per_direction")),
    ("in_batch_all_four", dict(hardness_mode="in_batch_negatives", hardness_strength=9.0, directions=ALL_FOUR)),
]
# float32: the CLIP-loss forms and the block forms (the Triton sweeps under TRITON_INTERPRET=1).
FLOAT32_OPTIONS = OPTIONS[:6] + [o for o in OPTIONS if o[0] in (
    "joint_symmetric", "all_four", "all_four_dot", "in_batch_negatives", "hard_negatives", "all_negatives",
    "hard_negatives_symmetric", "in_batch_all_four")]
BATCHES = (7, 13)
NEGATIVE_COLUMNS = (0, 1, 3)
DIM = 11


def _embeddings(n, k, dtype, seed, paired=True):
    """``[anchors, positives, negatives_1..k]``, (n, DIM) each, drawn in float64 and cast once;
    positives near their anchors so the loss is not log(N)."""
    gen = torch.Generator().manual_seed(seed)
    cols = [torch.randn(n, DIM, generator=gen, dtype=torch.float64) for _ in range(2 + k)]
    if paired:
        cols[1] = 0.8 * cols[0] + 0.6 * cols[1]
    return [c.to(dtype) for c in cols]


def _loss_and_grads(loss_fn, cols):
    leaves = [c.clone().requires_grad_(True) for c in cols]
    loss = loss_fn.compute_loss_from_embeddings(leaves, None)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name,opts", OPTIONS, ids=[o[0] for o in OPTIONS])
@pytest.mark.parametrize("k", NEGATIVE_COLUMNS)
@pytest.mark.parametrize("n", BATCHES)
def test_float64_matches_library(name, opts, k, n):
    """Loss and every embedding gradient within a relative 1e-9 of the library's, in float64."""
    cols = _embeddings(n, k, torch.float64, seed=n * 10 + k)
    want = _loss_and_grads(st_losses.MultipleNegativesRankingLoss(None, **opts), cols)
    got = _loss_and_grads(FastMultipleNegativesRankingLoss(None, **opts), cols)
    for what, g, w in zip(["loss", "anchor", "positive"] + [f"negative_{i}" for i in range(1, k + 1)], got, want):
        assert _rel(g, w) <= 1e-9, f"{name} n={n} k={k} {what}: relative difference {_rel(g, w):.3e}"


@pytest.mark.parametrize("name,opts", FLOAT32_OPTIONS, ids=[o[0] for o in FLOAT32_OPTIONS])
@pytest.mark.parametrize("k", NEGATIVE_COLUMNS)
def test_float32_within_precision_rule(name, opts, k):
    """fp32 twin vs float64 library: at most PRECISION_FACTOR x the library's own fp32 error, over 6 seeds."""
    n, errors = 13, {}
    lib, fast = st_losses.MultipleNegativesRankingLoss(None, **opts), FastMultipleNegativesRankingLoss(None, **opts)
    for seed in range(6):
        cols = _embeddings(n, k, torch.float64, seed=100 + seed)
        truth = _loss_and_grads(lib, cols)
        lib32 = _loss_and_grads(lib, [c.float() for c in cols])
        got = _loss_and_grads(fast, [c.float() for c in cols])
        for i, (g, w, m) in enumerate(zip(got, truth, lib32)):
            floor = max((m.double() - w).norm().item(), DTYPE_UNIT[torch.float32] * w.norm().item())
            errors.setdefault(i, []).append(((g.double() - w).norm().item(), floor))
    for i, pairs in errors.items():
        ratio = seed_ratio(*zip(*pairs))
        assert ratio <= PRECISION_FACTOR, f"{name} k={k} output {i}: {ratio:.2f} x the library's fp32 error"


def _log1p_reference(cols, scale):
    """The symmetric per-direction loss of cosine rows written as log1p(sum_{j != i}
    exp(S_ij - S_ii)): no cancellation of lse against S_ii, so accurate on confident rows."""
    q, *docs = [torch.nn.functional.normalize(c, dim=-1) for c in cols]
    n = q.shape[0]
    s_row = scale * q @ torch.cat(docs).T          # (n, n * (1 + k))
    s_col = scale * docs[0] @ q.T                  # doc i against every query
    off = ~torch.eye(n, s_row.shape[1], dtype=torch.bool)
    diag = s_row.diagonal()
    row = torch.log1p(torch.where(off, (s_row - diag[:, None]).exp(), 0.0).sum(1))
    col = torch.log1p(torch.where(off[:, :n], (s_col - diag[:, None]).exp(), 0.0).sum(1))
    return (row + col).mean() / 2


def test_confident_rows_at_scale_100():
    """Confident rows (scale 100, loss ~1e-11..1e-7): lse - S_ii cancels, so the library's own
    float64 loss is off in its leading digits; against an accurate log1p form the twin's error
    stays within PRECISION_FACTOR x the library's (floor: one float64 unit)."""
    opts = dict(scale=100.0, directions=SYMMETRIC, partition_mode="per_direction")
    for noise in (0.1, 0.3, 0.5):
        cols = _embeddings(9, 1, torch.float64, seed=5, paired=False)
        cols[1] = cols[0] + noise * cols[1]
        truth = _loss_and_grads(_Ref(), cols)
        lib = _loss_and_grads(st_losses.MultipleNegativesRankingLoss(None, **opts), cols)
        got = _loss_and_grads(FastMultipleNegativesRankingLoss(None, **opts), cols)
        assert truth[0].item() < 1e-6
        for i, (g, w, t) in enumerate(zip(got, lib, truth)):
            floor = max((w - t).norm().item(), DTYPE_UNIT[torch.float64] * t.norm().item())
            assert (g - t).norm().item() <= PRECISION_FACTOR * floor, f"noise {noise} output {i}"


class _Ref:
    def compute_loss_from_embeddings(self, cols, labels):
        return _log1p_reference(cols, 100.0)


def test_similarity_other_than_a_dot_product_is_refused_by_name():
    """A similarity that is not a scaled dot product is no sweep: both twins raise, naming it."""
    with pytest.raises(UnsupportedByClipFast, match="similarity_fct='manhattan_sim'"):
        FastMultipleNegativesRankingLoss(None, similarity_fct=util.manhattan_sim)
    stand_in = torch.nn.Sequential(torch.nn.Identity())  # the cached constructor inspects model[0]
    with pytest.raises(UnsupportedByClipFast, match="similarity_fct='manhattan_sim'"):
        FastCachedMultipleNegativesRankingLoss(stand_in, similarity_fct=util.manhattan_sim)


def test_option_changed_after_construction_is_refused_at_call():
    """Options are attributes; one set later to an unfused value is refused at the call."""
    loss = FastMultipleNegativesRankingLoss(None)
    loss.similarity_fct = util.manhattan_sim
    with pytest.raises(UnsupportedByClipFast, match="manhattan_sim"):
        loss.compute_loss_from_embeddings(_embeddings(5, 0, torch.float64, seed=0), None)


def test_option_changed_after_construction_is_used_at_call():
    """An option set after construction (here: directions) is the one the call computes."""
    cols = _embeddings(5, 1, torch.float64, seed=3)
    loss, lib = FastMultipleNegativesRankingLoss(None), st_losses.MultipleNegativesRankingLoss(None)
    loss.directions = lib.directions = ("query_to_doc", "doc_to_doc")
    for g, w in zip(_loss_and_grads(loss, cols), _loss_and_grads(lib, cols)):
        assert _rel(g, w) <= 1e-9


def test_config_dict_is_the_librarys():
    opts = dict(scale=30.0, directions=SYMMETRIC, partition_mode="per_direction")
    assert (FastMultipleNegativesRankingLoss(None, **opts).get_config_dict()
            == st_losses.MultipleNegativesRankingLoss(None, **opts).get_config_dict())


def test_import_clip_fast_does_not_import_sentence_transformers():
    code = "import sys, clip_fast; print('sentence_transformers' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.filterwarnings("ignore:Importing from 'sentence_transformers.losses' is deprecated")
def test_switch_swaps_the_classes_and_puts_them_back():
    """Inside the block every public name of the four classes builds the twin; after it, the library's."""
    import sentence_transformers.losses as public_losses

    names = ("MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss",
             "MultipleNegativesSymmetricRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss")
    before = {m: {n: getattr(m, n) for n in names} for m in (public_losses, st_losses)}
    with use_fast_st_losses():
        assert public_losses.MultipleNegativesRankingLoss is FastMultipleNegativesRankingLoss
        assert st_losses.CachedMultipleNegativesRankingLoss is FastCachedMultipleNegativesRankingLoss
        for m in before:
            for n in names:
                assert getattr(m, n).__module__ == "clip_fast.integrations.sentence_transformers", (m, n)
        sym = public_losses.MultipleNegativesSymmetricRankingLoss(None)
        assert (sym.directions, sym.partition_mode) == (SYMMETRIC, "per_direction")
        cached_sym = st_losses.CachedMultipleNegativesSymmetricRankingLoss(torch.nn.Sequential(torch.nn.Identity()))
        assert isinstance(cached_sym.loss, FastMultipleNegativesRankingLoss)
        assert (cached_sym.directions, cached_sym.partition_mode) == (SYMMETRIC, "per_direction")
    for m, old in before.items():
        assert {n: getattr(m, n) for n in names} == old


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from st_tiny_model import tiny_model

    return tiny_model(tmp_path_factory.mktemp("st") / "bert")


def _columns(model, n, k, seed):
    from st_tiny_model import sentences

    gen = torch.Generator().manual_seed(seed)
    return [model.tokenize(sentences(n, gen)) for _ in range(2 + k)]


def _param_grads(model, loss_fn, features, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both losses
    loss = loss_fn(features, None)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want, what):
    """Loss and every parameter gradient within a relative 1e-9; a gradient that is 0 in exact
    arithmetic (attention key biases: softmax ignores a shift) is rounding on both sides, so
    each parameter's floor is 1e-6 x the norm of all gradients."""
    assert _rel(got[0], want[0]) <= 1e-9, f"{what}: loss"
    assert got[1].keys() == want[1].keys() and want[1]
    total = torch.cat([w.flatten() for w in want[1].values()]).norm().item()
    for p, w in want[1].items():
        err = (got[1][p] - w).norm().item()
        assert err <= 1e-9 * max(w.norm().item(), 1e-6 * total), f"{what} {p}: {err:.3e}"


CACHED = [("default", dict()), ("symmetric", dict(directions=SYMMETRIC, partition_mode="per_direction")),
          ("dot", dict(similarity_fct=util.dot_score, scale=1.0)),
          ("num_tokens", dict(mini_batch_num_tokens=24)),
          ("all_four_in_batch", dict(directions=ALL_FOUR, hardness_mode="in_batch_negatives", hardness_strength=9.0)),
          ("hard_negatives_symmetric", dict(directions=SYMMETRIC, partition_mode="per_direction",
                                            hardness_mode="hard_negatives", hardness_strength=5.0))]


@pytest.mark.parametrize("name,opts", CACHED, ids=[c[0] for c in CACHED])
@pytest.mark.parametrize("k", NEGATIVE_COLUMNS)
def test_cached_twin_matches_library_on_a_model(tiny, name, opts, k):
    """The cached twin's loss and every parameter gradient against the library's cached loss
    (mini-batches of 4 rows, or of at most 24 tokens, over 9 rows; dropout on; float64),
    within a relative 1e-9."""
    tiny.train()
    features = _columns(tiny, 9, k, seed=k)
    want = _param_grads(tiny, st_losses.CachedMultipleNegativesRankingLoss(tiny, mini_batch_size=4, **opts),
                        features, seed=7)
    got = _param_grads(tiny, FastCachedMultipleNegativesRankingLoss(tiny, mini_batch_size=4, **opts),
                       features, seed=7)
    _assert_same(got, want, f"{name} k={k}")


def test_fused_twin_matches_library_on_a_model(tiny):
    """The plain twin through ``forward`` (the library's embedding stage) on the model, float64."""
    tiny.train()
    features = _columns(tiny, 7, 1, seed=3)
    want = _param_grads(tiny, st_losses.MultipleNegativesRankingLoss(tiny), features, seed=11)
    got = _param_grads(tiny, FastMultipleNegativesRankingLoss(tiny), features, seed=11)
    _assert_same(got, want, "plain")
