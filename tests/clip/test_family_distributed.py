"""The distributed CLIP loss with the family options (group_ids, label_smoothing,
image_to_text_weight, hard negatives) in gloo workers, against a float64 reference.

One spawn per world size (2 and 3; shards of 5, 3 and 7 rows) runs every case in the
worker processes: gather mode under all four (local_loss, gather_with_grad) flags and ring
mode, each option alone and all together (hard negatives with unequal M per rank, one
rank with M = 0), with per-rank upstream gradients so the gradients that travel between
ranks are told apart.  Every rank's loss and gradients (features, logit_scale, both kinds
of negatives) are compared with ``reference.reference_family_distributed``: that rank's
share, materialised in float64 with explicit target matrices and torch autograd through
open_clip-style gathered copies.  The Triton backend (interpreter on CPU) runs a few
small float32 cases.  Mismatched options across ranks must raise the same ValueError
on every rank, with no hang (gloo timeout and a spawn deadline).
"""
from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.nn.functional as F

from helpers import case_params, case_seed
from reference import reference_family_distributed

pytestmark = pytest.mark.slow  # two process spawns

SPAWN_DEADLINE_S = 300
GLOO_TIMEOUT_S = 30
FLAGS = [(False, False), (False, True), (True, False), (True, True)]  # (local_loss, gather_with_grad)
_TRITON = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or torch.cuda.is_available()
_DTYPES = {"float64": torch.float64, "float32": torch.float32}

# Each option alone, and all together.
OPTION_SETS = {
    "ids": dict(ids=True),
    "smoothing": dict(eps=0.1),
    "weight": dict(lam=0.3),
    "negatives": dict(negs=True),
    "all": dict(ids=True, eps=0.2, lam=0.7, negs=True),
}


def _sizes(world_size):
    return [5, 3] if world_size == 2 else [5, 3, 7]


def _neg_sizes(world_size):
    """(negative texts, negative images) per rank: unequal, one rank without any of each."""
    return ([2, 0], [0, 3]) if world_size == 2 else ([2, 0, 3], [1, 3, 0])


def _case(name, *, mode="gather", local=True, gwg=True, ids=False, eps=0.0, lam=0.5, negs=False,
          backend="torch", dtype="float64", dim=6, scale=7.0, bias=None, via="function", error=None,
          chunk_size=None, neg_sizes=None, reduce_scatter=False):
    return dict(name=name, mode=mode, local=local, gwg=gwg, ids=ids, eps=eps, lam=lam, negs=negs,
                backend=backend, dtype=dtype, dim=dim, scale=scale, bias=bias, via=via, error=error,
                chunk_size=chunk_size, neg_sizes=neg_sizes, reduce_scatter=reduce_scatter)


def _cases(world_size):
    cases = []
    for opt_name, opts in OPTION_SETS.items():
        for local, gwg in FLAGS:
            cases.append(_case(f"gather-{opt_name}-local{int(local)}-gwg{int(gwg)}", local=local, gwg=gwg,
                               **opts))
        cases.append(_case(f"ring-{opt_name}", mode="ring", **opts))
    cases += [
        # A logit_bias cancels from every softmax: its gradient is exactly 0 with the options too.
        _case("ring-all-bias", mode="ring", bias=0.75, **OPTION_SETS["all"]),
        _case("gather-all-bias-local0-gwg1", local=False, gwg=True, bias=-1.0, **OPTION_SETS["all"]),
        # One direction only: the other direction's negatives get no gradient.
        _case("ring-lam1-negatives", mode="ring", lam=1.0, negs=True, eps=0.1),
        _case("gather-lam0-negatives", lam=0.0, negs=True, eps=0.1),
        # Negatives given as (0, D) on every rank: the plain loss, zero negative gradients.
        _case("ring-empty-negatives", mode="ring", negs=True, neg_sizes=([0] * world_size, [0] * world_size)),
        _case("gather-empty-negatives-local0-gwg0", local=False, gwg=False, negs=True,
              neg_sizes=([0] * world_size, [0] * world_size)),
        # Confident rows (scale 60): the ring's own block takes its label terms from the kernels' diagonal.
        _case("ring-all-scale60", mode="ring", scale=60.0, **OPTION_SETS["all"]),
        # The NCCL branch of the gradient reduce-scatter (padded for unequal shards and
        # negatives), run on gloo.
        _case("gather-all-reduce-scatter-path", reduce_scatter=True, **OPTION_SETS["all"]),
        # float32 through strips of 2 rows.
        _case("ring-all-float32-chunked", mode="ring", dtype="float32", dim=33, chunk_size=2,
              **OPTION_SETS["all"]),
        # Through the public module (FastClipLoss routes world_size > 1 here).
        _case("module-ring-all", mode="ring", via="module", **OPTION_SETS["all"]),
        _case("module-gather-all-local0-gwg0", local=False, gwg=False, via="module", **OPTION_SETS["all"]),
        # Mismatched or bad options: every rank raises the same error, none hangs.
        _case("error-ids-on-some-ranks", error="ids_some"),
        _case("error-neg-txt-on-some-ranks", error="neg_txt_some", mode="ring"),
        _case("error-neg-img-empty-vs-none", error="neg_img_some"),
        _case("error-smoothing-differs", error="eps_differs"),
        _case("error-weight-differs", error="lam_differs", mode="ring"),
        _case("error-bad-ids-one-rank", error="bad_ids"),
        _case("error-bad-negatives-dtype", error="bad_neg_dtype", mode="ring"),
        _case("error-bad-smoothing-one-rank", error="bad_eps"),
        _case("after-errors-still-works", mode="ring", **OPTION_SETS["all"]),
    ]
    if _TRITON and world_size == 2:
        cases += [
            _case("triton-ring-all", mode="ring", backend="triton", dtype="float32", dim=16,
                  **OPTION_SETS["all"]),
            _case("triton-ring-plain", mode="ring", backend="triton", dtype="float32", dim=16),
            _case("triton-gather-all-local1-gwg1", backend="triton", dtype="float32", dim=16,
                  **OPTION_SETS["all"]),
            _case("triton-gather-all-local0-gwg1", local=False, gwg=True, backend="triton", dtype="float32",
                  dim=16, **OPTION_SETS["all"]),
        ]
    return cases


def _upstream(world_size):
    """A different upstream gradient per rank (loss * weight_r)."""
    return [1.0 + 0.5 * q for q in range(world_size)]


def _split(x, sizes):
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return [x[a:b] for a, b in zip(bounds, bounds[1:])]


def _global_case(case, world_size, seed):
    """Per-rank shards: features, ids (or None), negative texts and images (or None)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = _sizes(world_size)
    n, d = sum(sizes), case["dim"]
    dtype = _DTYPES[case["dtype"]]
    img = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64) + 0.5 * img, dim=1)
    # Groups of about three, spanning ranks.
    ids = torch.randint(0, max(2, n // 3), (n,), generator=gen)
    nt_sizes, ni_sizes = case["neg_sizes"] or _neg_sizes(world_size)
    nt = F.normalize(torch.randn(sum(nt_sizes), d, generator=gen, dtype=torch.float64), dim=1)
    ni = F.normalize(torch.randn(sum(ni_sizes), d, generator=gen, dtype=torch.float64), dim=1)
    return dict(imgs=_split(img.to(dtype), sizes), txts=_split(txt.to(dtype), sizes),
                ids=_split(ids, sizes) if case["ids"] else None,
                neg_txts=_split(nt.to(dtype), nt_sizes) if case["negs"] else None,
                neg_imgs=_split(ni.to(dtype), ni_sizes) if case["negs"] else None)


# ----------------------------------------------------------------------------------------
# Worker processes.
# ----------------------------------------------------------------------------------------

def _inputs(case, shards, rank, world_size):
    """This rank's leaves and keyword options, with the case's deliberate error applied."""
    dtype = _DTYPES[case["dtype"]]
    img = shards["imgs"][rank].clone().requires_grad_(True)
    txt = shards["txts"][rank].clone().requires_grad_(True)
    scale = torch.tensor(case["scale"], dtype=dtype, requires_grad=True)
    bias = None if case["bias"] is None else torch.tensor(case["bias"], dtype=dtype, requires_grad=True)
    nt = None if shards["neg_txts"] is None else shards["neg_txts"][rank].clone().requires_grad_(True)
    ni = None if shards["neg_imgs"] is None else shards["neg_imgs"][rank].clone().requires_grad_(True)
    opts = dict(group_ids=None if shards["ids"] is None else shards["ids"][rank],
                label_smoothing=case["eps"], image_to_text_weight=case["lam"],
                negative_text_features=nt, negative_image_features=ni)
    err, last = case["error"], rank == world_size - 1
    if err == "ids_some" and rank == 0:
        opts["group_ids"] = torch.zeros(img.shape[0], dtype=torch.int64)
    if err == "neg_txt_some" and not last:
        opts["negative_text_features"] = torch.randn(2, img.shape[1], dtype=dtype)
    if err == "neg_img_some" and last:
        opts["negative_image_features"] = torch.zeros(0, img.shape[1], dtype=dtype)
    if err == "eps_differs":
        opts["label_smoothing"] = 0.1 * rank
    if err == "lam_differs" and last:
        opts["image_to_text_weight"] = 0.25
    if err == "bad_ids" and last:
        opts["group_ids"] = torch.zeros(img.shape[0] + 1, dtype=torch.int64)
    if err == "bad_ids" and not last:
        opts["group_ids"] = torch.zeros(img.shape[0], dtype=torch.int64)
    if err == "bad_neg_dtype":
        opts["negative_text_features"] = torch.randn(2, img.shape[1], dtype=torch.float32 if last else dtype)
    if err == "bad_eps" and last:
        opts["label_smoothing"] = 1.5
    return img, txt, scale, bias, nt, ni, opts


def _run_case(case, rank, world_size, seed):
    import contextlib


    import clip_fast.core.collectives as cf_collectives
    from clip_fast import FastClipLoss
    from clip_fast.clip.distributed import distributed_clip_loss

    shards = _global_case(case, world_size, seed)
    img, txt, scale, bias, nt, ni, opts = _inputs(case, shards, rank, world_size)
    kwargs = dict(rank=rank, world_size=world_size, local_loss=case["local"], gather_with_grad=case["gwg"])
    blocks = contextlib.nullcontext()
    if case["backend"] == "triton" and not torch.cuda.is_available():
        # Large tiles under the interpreter, which pays per tile (as tests/conftest.py's kernel_blocks).
        from clip_fast.kernels import config as kconfig

        big = kconfig.Configs(forward=kconfig.KernelConfig(256, 256, 128, 4, 1),
                              backward=kconfig.KernelConfig(256, 256, 128, 4, 1), col_splits=1)
        blocks = kconfig.override(big)
    out = {}
    cf_collectives.FORCE_REDUCE_SCATTER = case["reduce_scatter"]
    try:
        with blocks:
            if case["via"] == "module":
                loss_fn = FastClipLoss(**kwargs, backend=case["backend"], distributed=case["mode"],
                                       chunk_size=case["chunk_size"], label_smoothing=opts["label_smoothing"],
                                       image_to_text_weight=opts["image_to_text_weight"])
                loss = loss_fn(img, txt, scale, bias, group_ids=opts["group_ids"],
                               negative_text_features=opts["negative_text_features"],
                               negative_image_features=opts["negative_image_features"])
            else:
                loss = distributed_clip_loss(img, txt, scale, bias, **kwargs, mode=case["mode"],
                                             backend=case["backend"], chunk_size=case["chunk_size"], **opts)
            (loss * _upstream(world_size)[rank]).backward()
        out.update(loss=loss.detach(), d_img=img.grad, d_txt=txt.grad, d_scale=scale.grad)
        if bias is not None:
            out["d_bias"] = bias.grad
        if nt is not None:
            out["d_neg_txt"] = nt.grad
        if ni is not None:
            out["d_neg_img"] = ni.grad
    except Exception as exc:  # recorded; the test decides whether an error was expected
        out["error"] = f"{type(exc).__name__}: {exc}"
        if case["error"] is None:
            out["error"] += "\n" + traceback.format_exc()
    return out


SEED = 4321


def _case_seed(world_size, case):
    """The seed the workers drew this case's shards from."""
    return case_seed(_cases(world_size), case, SEED)



def _params(kind):
    return case_params(_cases, kind)


def _assert_close(got, want, what, dtype, mag):
    rtol, atol = {"float64": (1e-9, 1e-11), "float32": (2e-4, 2e-6)}[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * max(1.0, mag),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world_size,case", _params("ok"))
def test_every_rank_matches_float64_reference(spawned, world_size, case):
    """Every rank's loss and gradients equal that rank's share of the float64 materialised loss."""
    results = [res[case["name"]] for res in spawned(world_size)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} raised: {res['error']}"
    shards = _global_case(case, world_size, _case_seed(world_size, case))
    ref = reference_family_distributed(
        shards["imgs"], shards["txts"], case["scale"], ids=shards["ids"], eps=case["eps"], lam=case["lam"],
        neg_txts=shards["neg_txts"], neg_imgs=shards["neg_imgs"], local_loss=case["local"],
        gather_with_grad=case["gwg"], upstream=_upstream(world_size), bias=case["bias"])
    dt = case["dtype"]
    for r, res in enumerate(results):
        loss, d_img, d_txt, d_scale, d_nt, d_ni, d_bias = ref[r]
        _assert_close(res["loss"], loss, f"rank {r} loss", dt, case["scale"])
        _assert_close(res["d_img"], d_img, f"rank {r} d_img", dt, d_img.abs().max().item())
        _assert_close(res["d_txt"], d_txt, f"rank {r} d_txt", dt, d_txt.abs().max().item())
        _assert_close(res["d_scale"], d_scale, f"rank {r} d_scale", dt, 1.0)
        if case["bias"] is not None:
            assert torch.equal(res["d_bias"], torch.zeros_like(res["d_bias"])), res["d_bias"]
            _assert_close(res["d_bias"], d_bias, f"rank {r} d_bias", dt, 1.0)
        if case["negs"]:
            for key, want in (("d_neg_txt", d_nt), ("d_neg_img", d_ni)):
                got = res[key]
                assert got is not None and got.shape == want.shape, f"rank {r} {key}: {got}"
                _assert_close(got, want, f"rank {r} {key}", dt, want.abs().max().item() if want.numel() else 1.0)


_EXPECTED = {
    "ids_some": ["whether group_ids is given differs across ranks"],
    "neg_txt_some": ["whether negative_text_features is given differs across ranks"],
    "neg_img_some": ["whether negative_image_features is given differs across ranks"],
    "eps_differs": ["label_smoothing differs across ranks"],
    "lam_differs": ["image_to_text_weight differs across ranks"],
    "bad_ids": ["invalid input on rank(s) [{last}]", "group_ids must have shape"],
    "bad_neg_dtype": ["invalid input on rank(s) [{last}]", "negative_text_features must have the features' dtype"],
    "bad_eps": ["invalid input on rank(s) [{last}]", "label_smoothing must be a float in [0, 1)"],
}


@pytest.mark.parametrize("world_size,case", _params("error"))
def test_mismatched_options_raise_same_error_on_every_rank(spawned, world_size, case):
    """Options given on some ranks only, differing, or bad on one rank: the same clear
    ValueError on every rank (no hang), and the group stays usable afterwards."""
    results = [res[case["name"]] for res in spawned(world_size)]
    messages = [res.get("error") for res in results]
    assert all(m is not None for m in messages), f"some ranks did not raise: {messages}"
    assert len(set(messages)) == 1, f"ranks raised different errors: {messages}"
    assert messages[0].startswith("ValueError"), messages[0]
    for part in _EXPECTED[case["error"]]:
        assert part.format(last=world_size - 1) in messages[0], messages[0]
