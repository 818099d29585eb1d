"""``gather_across_devices`` in gloo workers: the fused twin against sentence-transformers'
own ``MultipleNegativesRankingLoss`` on every rank.

Each worker computes the library's loss and the twin's on its shard (float64 and fp32),
backpropagates ``upstream[rank] x loss`` (a different factor per rank, so gradients that
travel between ranks are told apart) and keeps the loss and every embedding gradient.
Equal shards of 5 rows on 2 and 3 ranks, 0, 1 and 3 hard-negative columns: float64 within
a relative 1e-9 of the library, fp32 within the precision rule over 4 seeds.

The cached twin's loss stage against the library's cached loss stage, on every rank, float64.

Unequal last batches (5, 5, 3 rows): the library cannot run them (``all_gather`` needs equal
shapes; gloo aborts the process), so the twin is judged against ``_oracle``, which
materialises what the library computes on equal shards (every rank's local rows against the
gathered candidates, gradients summed over the ranks' losses), and for the block forms
(masked self-blocks, joint softmaxes, hardness) against ``_library_oracle``, the library's
own loss run in one process on each rank's rotated view; both are checked against the
library on the equal cases.
"""
from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F

from helpers import DTYPE_UNIT, PRECISION_FACTOR, case_seed, seed_ratio

pytest.importorskip("sentence_transformers", reason="the sentence-transformers extra is not installed")

pytestmark = pytest.mark.slow  # process spawns

SPAWN_DEADLINE_S = 600
GLOO_TIMEOUT_S = 60
SEED = 2411
DIM = 7
SYMMETRIC = ("query_to_doc", "doc_to_query")
ALL_FOUR = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
OPTIONS = {"default": dict(), "symmetric": dict(directions=SYMMETRIC, partition_mode="per_direction"),
           "dot": dict(similarity_fct="dot_score", scale=1.0),
           # The block forms (clip_fast.clip.blocks) and their own gather.
           "all_four_in_batch": dict(directions=ALL_FOUR, hardness_mode="in_batch_negatives", hardness_strength=9.0),
           "hard_symmetric": dict(directions=SYMMETRIC, partition_mode="per_direction",
                                  hardness_mode="hard_negatives", hardness_strength=5.0),
           "joint_dot_all": dict(directions=("query_to_doc", "doc_to_query", "doc_to_doc"), similarity_fct="dot_score",
                                 scale=1.0, hardness_mode="all_negatives", hardness_strength=0.5)}
BLOCK_FORMS = ("all_four_in_batch", "hard_symmetric", "joint_dot_all")


def _cases(world_size):
    cases = [dict(name=f"{opt}-k{k}", opt=opt, k=k, dtype="float64", equal=True)
             for opt in OPTIONS for k in (0, 1, 3)]
    cases += [dict(name=f"fp32-{opt}-s{s}", opt=opt, k=1, dtype="float32", equal=True)
              for opt in ("default", "symmetric", "all_four_in_batch") for s in range(4)]
    cases += [dict(name=f"unequal-{opt}-k{k}", opt=opt, k=k, dtype="float64", equal=False)
              for opt in ("default", "symmetric") + BLOCK_FORMS for k in (0, 3)]
    cases += [dict(name=f"cached-{opt}-k{k}", opt=opt, k=k, dtype="float64", equal=True, cached=True)
              for opt in ("default", "symmetric", "all_four_in_batch") for k in (0, 1)]
    return cases


def _sizes(case, world_size):
    return [5] * world_size if case["equal"] else [5] * (world_size - 1) + [3]


def _shards(case, world_size, seed):
    """Every rank's columns ``[anchors, positives, negatives..]`` in float64: a list per rank."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(_sizes(case, world_size))
    cols = [torch.randn(n, DIM, generator=gen, dtype=torch.float64) for _ in range(2 + case["k"])]
    cols[1] = 0.8 * cols[0] + 0.6 * cols[1]
    split = [c.split(_sizes(case, world_size)) for c in cols]
    return [[s[r] for s in split] for r in range(world_size)]


def _upstream(world_size):
    return [1.0 + 0.5 * r for r in range(world_size)]


def _options(case):
    from sentence_transformers import util

    opts = dict(OPTIONS[case["opt"]], gather_across_devices=True)
    if opts.get("similarity_fct") == "dot_score":
        opts["similarity_fct"] = util.dot_score
    return opts


def _grads(loss_fn, cols, factor):
    leaves = [c.clone().requires_grad_(True) for c in cols]
    loss = loss_fn.compute_loss_from_embeddings(leaves, None)
    (loss * factor).backward()
    return [loss.detach()] + [x.grad for x in leaves]


def _cached_grads(loss_fn, cols):
    """The cached loss stage: ``calculate_loss(with_backward=True)`` on mini-batches of 2 rows."""
    reps = [[m.clone().requires_grad_(True) for m in c.split(2)] for c in cols]
    loss = loss_fn.calculate_loss(reps, None, with_backward=True)
    return [loss.detach()] + [torch.cat([m.grad for m in col]) for col in reps]


def _run_cached(case, cols):
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    from clip_fast.integrations.sentence_transformers import FastCachedMultipleNegativesRankingLoss

    stand_in = torch.nn.Sequential(torch.nn.Identity())  # the constructor inspects model[0]
    return {"fast": _cached_grads(FastCachedMultipleNegativesRankingLoss(stand_in, **_options(case)), cols),
            "lib": _cached_grads(CachedMultipleNegativesRankingLoss(stand_in, **_options(case)), cols)}


def _run_case(case, rank, world_size, seed):
    import torch.distributed as dist
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from clip_fast.integrations.sentence_transformers import FastMultipleNegativesRankingLoss

    cols = [c.to(getattr(torch, case["dtype"])) for c in _shards(case, world_size, seed)[rank]]
    factor, out = _upstream(world_size)[rank], {}
    try:
        if case.get("cached"):
            out.update(_run_cached(case, cols))
            dist.barrier()
            return out
        out["fast"] = _grads(FastMultipleNegativesRankingLoss(None, **_options(case)), cols, factor)
        if case["equal"]:
            lib = MultipleNegativesRankingLoss(None, **_options(case))
            out["lib"] = _grads(lib, cols, factor)
            if case["dtype"] == "float32":
                out["lib64"] = _grads(lib, [c.double() for c in cols], factor)
    except Exception as exc:  # recorded; every case here must succeed
        out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    return out



def _oracle(case, world_size, shards):
    """Per rank ``[loss, d_col_0, d_col_1, ..]`` of the library's gathered loss, materialised:
    rank r's rows against every rank's candidates, offsets by the real shard sizes, and
    each embedding's gradient summed over ``upstream[q] x loss_q`` of every rank q."""
    sizes, scale = _sizes(case, world_size), OPTIONS[case["opt"]].get("scale", 20.0)
    cols = [torch.cat([s[i] for s in shards]).requires_grad_(True) for i in range(2 + case["k"])]
    unit = [F.normalize(c, dim=-1) for c in cols] if case["opt"] != "dot" else cols
    rows = scale * unit[0] @ torch.cat(unit[1:]).T
    ce_row = torch.logsumexp(rows, 1) - rows.diagonal()
    ce_col = torch.logsumexp(rows[:, :rows.shape[0]].T, 1) - rows.diagonal()
    per_row = (ce_row + ce_col) / 2 if case["opt"] == "symmetric" else ce_row
    losses = [chunk.mean() for chunk in per_row.split(sizes)]
    total = sum(u * loss for u, loss in zip(_upstream(world_size), losses))
    grads = torch.autograd.grad(total, cols)
    return [[losses[r].detach()] + [g.split(sizes)[r] for g in grads] for r in range(world_size)]


def _library_oracle(case, world_size, shards):
    """Per rank ``[loss, d_col_0, ..]`` of the library's own gathered loss, run in one process
    for any shard sizes: rank r's view is every column rotated so that r's rows come first
    (the library's gather patched to return it, its rank to 0), which changes no softmax
    (a softmax ignores its candidates' order, and the masks follow the rows); gradients
    summed over ``upstream[q] x loss_q`` of every rank q."""
    from sentence_transformers.sentence_transformer.losses import multiple_negatives_ranking as mnrl

    sizes = _sizes(case, world_size)
    offsets = [sum(sizes[:r]) for r in range(world_size)]
    cols = [torch.cat([s[i] for s in shards]).requires_grad_(True) for i in range(2 + case["k"])]
    losses, saved = [], (mnrl.all_gather_with_grad, mnrl.get_rank)
    try:
        for r, o in enumerate(offsets):
            view = {id(c): torch.cat([c[o:], c[:o]]) for c in cols}
            local = [view[id(c)][:sizes[r]] for c in cols]
            full = {id(t): view[id(c)] for t, c in zip(local, cols)}
            mnrl.all_gather_with_grad, mnrl.get_rank = (lambda t: full[id(t)]), (lambda: 0)
            losses.append(mnrl.MultipleNegativesRankingLoss(None, **_options(case)).compute_loss_from_embeddings(local, None))
    finally:
        mnrl.all_gather_with_grad, mnrl.get_rank = saved
    grads = torch.autograd.grad(sum(u * loss for u, loss in zip(_upstream(world_size), losses)), cols)
    return [[losses[r].detach()] + [g.split(sizes)[r] for g in grads] for r in range(world_size)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _results(spawned, world_size, case):
    results = [res[case["name"]] for res in spawned(world_size)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} {case['name']} raised: {res['error']}"
    return results


def _params(select):
    return [pytest.param(w, c, id=f"w{w}-{c['name']}") for w in (2, 3) for c in _cases(w) if select(c)]


@pytest.mark.parametrize("world_size,case", _params(lambda c: c.get("cached")))
def test_gathered_cached_loss_stage_matches_library_on_every_rank(spawned, world_size, case):
    """The cached twin's loss stage (one fused call) against the library's (a loop over
    mini-batches, each with its own backward): every rank's loss and embedding gradients."""
    for r, res in enumerate(_results(spawned, world_size, case)):
        for i, (got, want) in enumerate(zip(res["fast"], res["lib"])):
            assert _rel(got, want) <= 1e-9, f"rank {r} output {i}: {_rel(got, want):.3e}"


@pytest.mark.parametrize("world_size,case",
                         _params(lambda c: c["equal"] and c["dtype"] == "float64" and not c.get("cached")))
def test_gathered_float64_matches_library_on_every_rank(spawned, world_size, case):
    """Every rank's loss and embedding gradients within a relative 1e-9 of the library's,
    and the oracle used for unequal shards agrees with the library too."""
    shards = _shards(case, world_size, case_seed(_cases(world_size), case, SEED))
    oracle = _library_oracle(case, world_size, shards)
    materialised = _oracle(case, world_size, shards) if case["opt"] not in BLOCK_FORMS else oracle
    for r, res in enumerate(_results(spawned, world_size, case)):
        for i, (got, want, ref, mat) in enumerate(zip(res["fast"], res["lib"], oracle[r], materialised[r])):
            assert _rel(got, want) <= 1e-9, f"rank {r} output {i}: {_rel(got, want):.3e}"
            assert _rel(ref, want) <= 1e-9, f"rank {r} output {i}: the one-process oracle is off the library"
            assert _rel(mat, want) <= 1e-9, f"rank {r} output {i}: the materialised oracle is off the library"


@pytest.mark.parametrize("opt", ["default", "symmetric", "all_four_in_batch"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_gathered_float32_within_precision_rule(spawned, world_size, opt):
    """fp32 on every rank: within PRECISION_FACTOR x the library's own fp32 error over 4 seeds."""
    errors = {}
    for case in [c for c in _cases(world_size) if c["dtype"] == "float32" and c["opt"] == opt]:
        for r, res in enumerate(_results(spawned, world_size, case)):
            for i, (got, lib32, truth) in enumerate(zip(res["fast"], res["lib"], res["lib64"])):
                floor = max((lib32.double() - truth).norm().item(), DTYPE_UNIT[torch.float32] * truth.norm().item())
                errors.setdefault((r, i), []).append(((got.double() - truth).norm().item(), floor))
    for (r, i), pairs in errors.items():
        ratio = seed_ratio(*zip(*pairs))
        assert ratio <= PRECISION_FACTOR, f"rank {r} output {i}: {ratio:.2f} x the library's fp32 error"


@pytest.mark.parametrize("world_size,case", _params(lambda c: not c["equal"]))
def test_gathered_unequal_last_batch_matches_oracle(spawned, world_size, case):
    """A short last shard: what the library computes on equal shards, with the real offsets
    (the block forms against the library's own loss in one process, ``_library_oracle``)."""
    shards = _shards(case, world_size, case_seed(_cases(world_size), case, SEED))
    oracle = (_library_oracle if case["opt"] in BLOCK_FORMS else _oracle)(case, world_size, shards)
    for r, res in enumerate(_results(spawned, world_size, case)):
        for i, (got, want) in enumerate(zip(res["fast"], oracle[r])):
            assert _rel(got, want) <= 1e-9, f"rank {r} output {i}: {_rel(got, want):.3e}"
