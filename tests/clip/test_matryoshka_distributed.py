"""The Matryoshka CLIP loss across gloo ranks (gather mode with each (local_loss,
gather_with_grad), ring mode) against an independent float64 reference: every rank's share
of open_clip's ``ClipLoss``, one materialised loss per prefix size, summed with the weights
(``reference.reference_family_distributed(matryoshka=...)``, autograd through the prefix
normalisation; no clip_fast code).

float64: every rank's loss and gradients (features, hard negatives and logit_scale; a
different upstream gradient per rank, so the gradients travelling between ranks are told
apart) to 1e-9 relative.  float32: the precision rule (tests/helpers.py) against the same
materialised loss run in float32, over 8 seeds (``helpers.seed_ratio``), on confident rows
at scale 100 (|S| ~ 100, per-size losses ~1e-3 and below).  Shards of 7 rows (open_clip
gathers equal shards), D = 13, sizes (3, 8, 13) and (5, 11) (the largest below D), strips
of 3 rows so the sweeps cross strip and segment boundaries; 2 and 3 ranks, the torch backend
("auto" on CPU) and the Triton backend (its nested kernels under the interpreter; every path,
both size sets, float64 and fp32 over the 8 seeds, all options together, the module).
Options: group_ids, label_smoothing, hard negatives (unequal counts per rank, one rank
none), image_to_text_weight, and all together, in gather mode (two flag pairs) and ring
mode; the module ``FastClipLoss``.  Mismatched or bad Matryoshka options raise the same
error on every rank (no hang).
"""
from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F

from helpers import DTYPE_UNIT, PRECISION_FACTOR, case_params, case_seed, seed_ratio
from reference import reference_family_distributed

pytestmark = pytest.mark.slow  # two process spawns

SEED = 4410
SPAWN_DEADLINE_S = 300
GLOO_TIMEOUT_S = 60
N_LOCAL, DIM, CHUNK = 7, 13, 3
FLAGS = [(False, False), (False, True), (True, False), (True, True)]  # (local_loss, gather_with_grad)
PATHS = [("gather", local, gwg) for local, gwg in FLAGS] + [("ring", True, True)]
SIZES = {"three": ((3, 8, 13), (1.0, 0.5, 2.0)), "below_d": ((11, 5), None)}
QUANTITIES = ("loss", "d_img", "d_txt", "d_scale", "d_neg_txt", "d_neg_img")  # reference order


NEG_SIZES = [3, 0, 2]  # hard negatives per rank (texts and images): unequal, one rank none
SEEDS = range(8)
# The loss options, in gather mode (two flag pairs) and ring mode.
OPTIONS = {"ids": dict(ids=True), "smoothing": dict(eps=0.1), "negatives": dict(negs=True),
           "all": dict(ids=True, eps=0.1, lam=0.3, negs=True)}
RING_OPTIONS = {"ids": dict(ids=True), "smoothing": dict(eps=0.1), "negatives-lam": dict(negs=True, lam=0.7),
                "all": dict(ids=True, eps=0.1, lam=0.3, negs=True)}


def _case(name, *, mode="gather", local=True, gwg=True, dtype="float64", regime="random", sizes="three",
          renorm=True, lam=0.5, via="function", error=None, bad=None, ids=False, eps=0.0, negs=False,
          backend="auto"):
    return dict(name=name, mode=mode, local=local, gwg=gwg, dtype=dtype, regime=regime, sizes=sizes,
                renorm=renorm, lam=lam, via=via, error=error, bad=bad, ids=ids, eps=eps, negs=negs,
                backend=backend)


def _path_cases(prefix="", **extra):
    """Every path (gather's four flag pairs, the ring) with and without re-normalisation: both
    size sets in float64, and fp32 confident rows over the seeds."""
    cases = []
    for mode, local, gwg in PATHS:
        tag = f"{prefix}{mode}-local{int(local)}-gwg{int(gwg)}"
        flags = dict(mode=mode, local=local, gwg=gwg, **extra)
        for renorm in (True, False):
            for sizes in SIZES:
                cases.append(_case(f"f64-{tag}-{sizes}-renorm{int(renorm)}", sizes=sizes, renorm=renorm, **flags))
            for seed in SEEDS:
                cases.append(_case(f"f32-{tag}-renorm{int(renorm)}-s{seed}", dtype="float32", regime="confident",
                                   renorm=renorm, **flags))
    return cases


def _cases(world_size):
    cases = _path_cases()
    options = [(opt, kw, dict(local=local, gwg=gwg)) for opt, kw in OPTIONS.items()
               for local, gwg in ((True, True), (False, False))]
    options += [(opt, kw, dict(mode="ring")) for opt, kw in RING_OPTIONS.items()]
    for opt, kw, flags in options:
        tag = f"{flags.get('mode', 'gather')}-{opt}-local{int(flags.get('local', 1))}-gwg{int(flags.get('gwg', 1))}"
        for renorm in (True, False):
            cases.append(_case(f"f64-{tag}-renorm{int(renorm)}", renorm=renorm, **kw, **flags))
        for seed in SEEDS:
            cases.append(_case(f"f32-{tag}-s{seed}", dtype="float32", regime="confident", **kw, **flags))
    cases.append(_case("f64-lam-gather-local0-gwg0", local=False, gwg=False, lam=0.3))
    cases.append(_case("f64-lam-ring", mode="ring", lam=0.8, sizes="below_d"))
    cases.append(_case("f64-module-gather-local1-gwg0", local=True, gwg=False, via="module"))
    cases.append(_case("f64-module-ring", mode="ring", via="module", renorm=False))
    cases += _triton_cases()
    # Every rank must raise the same error; rank 1 alone differs where it is marked.
    cases.append(_case("err-dims-differ", bad="dims", error="Matryoshka options"))
    cases.append(_case("err-weights-differ", mode="ring", bad="weights", error="Matryoshka options"))
    cases.append(_case("err-renorm-differ", bad="renorm", error="Matryoshka options"))
    cases.append(_case("err-one-rank-without", bad="none", error="Matryoshka options"))
    cases.append(_case("err-dims-above-d", bad="big", error=r"matryoshka_dims must lie in \[1, D\] = \[1, 13\]"))
    return cases


def _triton_cases():
    """The Triton nested sweeps (the interpreter on CPU) on the gathered and ring blocks:
    every path with and without re-normalisation, both size sets, float64 and fp32 confident
    rows (TRITON_INTERPRET reaches the spawned ranks through the environment, tests/conftest.py)."""
    cases = _path_cases("triton-", backend="triton")
    for mode, flags in (("gather", dict(local=False, gwg=False)), ("ring", dict(mode="ring"))):
        cases.append(_case(f"f64-triton-{mode}-all", ids=True, eps=0.1, lam=0.3, negs=True, backend="triton",
                           **flags))
    cases.append(_case("f64-triton-module-ring", mode="ring", via="module", backend="triton"))
    return cases


def _matryoshka(case, rank):
    dims, weights = SIZES[case["sizes"]]
    renorm = case["renorm"]
    if rank == 1 and case["bad"] == "dims":
        dims = (3, 9, 13)
    if rank == 1 and case["bad"] == "weights":
        weights = (1.0, 0.5, 2.5)
    if rank == 1 and case["bad"] == "renorm":
        renorm = not renorm
    if rank == 1 and case["bad"] == "none":
        dims = None
    if rank == 1 and case["bad"] == "big":
        dims = (3, 14)
        weights = None
    return dims, weights, renorm


def _shards(case, world_size, seed):
    """Per-rank (img, txt, ids, negative texts, negative images) of the case's dtype and the
    scale: unnormalised rows of different norms (the prefix normalisation matters), or
    confident unit rows at scale 100; ids, negatives None unless the case asks for them."""
    gen = torch.Generator().manual_seed(seed)
    n = N_LOCAL * world_size
    img = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    if case["regime"] == "confident":
        img = F.normalize(img, dim=1)
        txt = img + 0.05 * torch.randn(n, DIM, generator=gen, dtype=torch.float64)
        scale = 100.0
    else:
        img = img * (0.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64))
        txt = 0.6 * img + 0.8 * torch.randn(n, DIM, generator=gen, dtype=torch.float64)
        scale = 4.0 if not case["renorm"] else 9.0
    dtype = getattr(torch, case["dtype"])
    ids = torch.randint(0, max(2, n // 3), (n,), generator=gen).split(N_LOCAL) if case["ids"] else None
    m = NEG_SIZES[:world_size]
    negs = [torch.randn(sum(m), DIM, generator=gen, dtype=torch.float64).to(dtype).split(m) for _ in range(2)]
    nt, ni = negs if case["negs"] else (None, None)
    return img.to(dtype).split(N_LOCAL), txt.to(dtype).split(N_LOCAL), ids, nt, ni, scale


def _upstream(world_size):
    return [1.0 + 0.5 * q for q in range(world_size)]


def _loss(case, img, txt, scale, ids, nt, ni, rank, world_size):
    dims, weights, renorm = _matryoshka(case, rank)
    flags = dict(rank=rank, world_size=world_size, local_loss=case["local"], gather_with_grad=case["gwg"])
    opts = dict(image_to_text_weight=case["lam"], label_smoothing=case["eps"], chunk_size=CHUNK,
                backend=case["backend"])
    per_batch = dict(group_ids=ids, negative_text_features=nt, negative_image_features=ni)
    if case["via"] == "module":
        import clip_fast

        fn = clip_fast.FastClipLoss(distributed=case["mode"], matryoshka_dims=dims, matryoshka_weights=weights,
                                    matryoshka_renormalize=renorm, **flags, **opts)
        return fn(img, txt, scale, **per_batch)
    from clip_fast.clip.distributed import distributed_clip_loss

    return distributed_clip_loss(img, txt, scale, distributed=case["mode"], matryoshka_dims=dims,
                                 matryoshka_weights=weights, matryoshka_renormalize=renorm, **flags, **opts,
                                 **per_batch)


def _run_case(case, rank, world_size, seed):
    imgs, txts, ids, nts, nis, scale = _shards(case, world_size, seed)
    img = imgs[rank].clone().requires_grad_(True)
    txt = txts[rank].clone().requires_grad_(True)
    nt = None if nts is None else nts[rank].clone().requires_grad_(True)
    ni = None if nis is None else nis[rank].clone().requires_grad_(True)
    s = torch.tensor(scale, dtype=img.dtype, requires_grad=True)
    out = {}
    try:
        loss = _loss(case, img, txt, s, None if ids is None else ids[rank], nt, ni, rank, world_size)
        out["loss"] = loss.detach()
        (loss * _upstream(world_size)[rank]).backward()
        out.update(d_img=img.grad, d_txt=txt.grad, d_scale=s.grad)
        if nt is not None:
            out.update(d_neg_txt=nt.grad, d_neg_img=ni.grad)
    except Exception as exc:  # recorded: the error cases expect one on every rank
        out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    return out


def _references(case, world_size, dtype=torch.float64):
    imgs, txts, ids, nts, nis, scale = _shards(case, world_size, case_seed(_cases(world_size), case, SEED))
    dims, weights, renorm = _matryoshka(case, 0)
    return reference_family_distributed(imgs, txts, scale, ids=ids, eps=case["eps"], lam=case["lam"],
                                        neg_txts=nts, neg_imgs=nis, local_loss=case["local"],
                                        gather_with_grad=case["gwg"], upstream=_upstream(world_size),
                                        dtype=dtype, matryoshka=(dims, weights, renorm))


def _results(spawned, world_size, case):
    results = [res[case["name"]] for res in spawned(world_size)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} {case['name']} raised: {res['error']}"
    return results


def _rel(got, want):
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-300))


@pytest.mark.parametrize("world_size,case", case_params(
    lambda w: [c for c in _cases(w) if c["dtype"] == "float64"], "ok"))
def test_float64_equals_sum_of_per_size_losses(spawned, world_size, case):
    """Every rank's loss and gradients equal the float64 sum of per-size open_clip losses to 1e-9."""
    ref = _references(case, world_size)
    for r, res in enumerate(_results(spawned, world_size, case)):
        for k, what in enumerate(QUANTITIES):
            if what in res:  # the negatives' gradients where the case has negatives
                assert _rel(res[what], ref[r][k]) <= 1e-9, (r, what, _rel(res[what], ref[r][k]))


def _families(world_size):
    families = {}
    for c in _cases(world_size):
        if c["dtype"] == "float32":
            families.setdefault(c["name"].rsplit("-s", 1)[0], []).append(c)
    return families


@pytest.mark.parametrize("world_size,family", [pytest.param(w, f, id=f"w{w}-{f}") for w in (2, 3)
                                               for f in _families(w)])
def test_float32_precision_rule_on_confident_rows(spawned, world_size, family):
    """fp32 at scale 100: each rank's error against float64 within PRECISION_FACTOR x the
    materialised fp32 per-size losses' error (floor: one fp32 unit of the reference), over 8 seeds."""
    errors = {}
    for case in _families(world_size)[family]:
        ref, mat = _references(case, world_size), _references(case, world_size, torch.float32)
        for r, res in enumerate(_results(spawned, world_size, case)):
            for k, what in enumerate(QUANTITIES):
                if what not in res:
                    continue
                want = ref[r][k].double()
                err = float((res[what].double() - want).norm())
                floor = max(float((mat[r][k].double() - want).norm()), DTYPE_UNIT[torch.float32] * float(want.norm()))
                errors.setdefault((r, what), []).append((err, floor))
    for (r, what), pairs in errors.items():
        ratio = seed_ratio(*zip(*pairs))
        assert ratio <= PRECISION_FACTOR, (r, what, ratio, pairs)


@pytest.mark.parametrize("world_size,case", case_params(_cases, "error"))
def test_bad_matryoshka_options_raise_on_every_rank(spawned, world_size, case):
    """Options that differ across ranks, sizes above D on one rank, or an option the nested
    distributed path does not take: the same ValueError on every rank, no hang."""
    import re

    results = [res[case["name"]] for res in spawned(world_size)]
    for r, res in enumerate(results):
        assert "error" in res, f"rank {r}: {case['name']} did not raise"
        first = res["error"].splitlines()[0]
        assert first.startswith("ValueError"), (r, first)
        assert re.search(case["error"], res["error"]), (r, res["error"])
