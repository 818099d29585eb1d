"""The Matryoshka (nested-size) CLIP loss in one sweep against separate float64 losses.

Oracle: ``reference.reference_matryoshka_loss``, one materialised loss per size with
autograd through the prefix normalisation (no clip_fast code).  float64: loss and every
gradient to 1e-9 relative; float32 / bfloat16: the precision rule (tests/helpers.py) against
the same materialised losses run in that dtype.  Sizes that are not multiples of anything
(5, 13, 29 of D = 29; 3, 17 of D = 30, the largest size below D) and strips of a few rows
(``chunk_size``) so every sweep crosses strip and segment boundaries.  Covers the torch
backend; tests/kernels/test_nested_triton.py covers Triton's.
"""
from __future__ import annotations

import pytest
import torch

from helpers import DTYPE_UNIT as UNIT, GemmFlops as _GemmFlops, PRECISION_FACTOR as FACTOR, paired_features, seed_ratio
from reference import reference_matryoshka_loss

import clip_fast


def _options(kind, n, d, dtype, gen):
    if kind == "plain":
        return {}
    if kind == "groups":
        return dict(group_ids=torch.randint(0, max(2, n // 3), (n,), generator=gen))
    if kind == "smooth_weight":
        return dict(label_smoothing=0.1, image_to_text_weight=0.3)
    if kind == "negatives":
        return dict(negative_text_features=torch.randn(5, d, generator=gen, dtype=torch.float64).to(dtype),
                    negative_image_features=torch.randn(3, d, generator=gen, dtype=torch.float64).to(dtype),
                    label_smoothing=0.05, group_ids=torch.randint(0, 4, (n,), generator=gen))
    raise ValueError(kind)


def _reference_kwargs(opts):
    out = {k: v for k, v in opts.items() if not k.startswith("negative")}
    out["negative_text"] = opts.get("negative_text_features")
    out["negative_image"] = opts.get("negative_image_features")
    return out


def _run(img, txt, scale, dims, weights, renorm, opts, chunk_size=None, backend="auto"):
    """clip_fast's loss and the gradients of (img, txt, scale, negatives) in float64."""
    leaves = {"img": img.clone().requires_grad_(True), "txt": txt.clone().requires_grad_(True),
              "scale": torch.tensor(scale, dtype=torch.float64 if img.dtype == torch.float64 else torch.float32,
                                    requires_grad=True)}
    opts = dict(opts)
    for k in ("negative_text_features", "negative_image_features"):
        if k in opts:
            opts[k] = leaves[k] = opts[k].clone().requires_grad_(True)
    loss = clip_fast.clip_loss(leaves["img"], leaves["txt"], leaves["scale"], matryoshka_dims=dims,
                               matryoshka_weights=weights, matryoshka_renormalize=renorm, chunk_size=chunk_size,
                               backend=backend, **opts)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [loss.detach().double()] + [g.double() for g in grads]


def _reference(img, txt, scale, dims, weights, renorm, opts, dtype=torch.float64):
    ref = reference_matryoshka_loss(img, txt, scale, dims, weights, renorm, dtype=dtype,
                                    **_reference_kwargs(opts))
    return [t.double() for t in ref if t is not None]


def _rel(got, ref):
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


CASES_64 = [
    # (n, d, dims, weights, chunk_size)
    (23, 29, (5, 13, 29), (1.0, 0.5, 2.0), 7),
    (17, 30, (17, 3), None, 4),       # unsorted sizes, the largest below D
    (9, 8, (8,), None, None),         # one size: the plain loss of the normalised features
]


@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("kind", ["plain", "groups", "smooth_weight", "negatives"])
@pytest.mark.parametrize("case", CASES_64, ids=["odd3", "unsorted", "single"])
def test_float64_equals_separate_losses(case, kind, renorm):
    n, d, dims, weights, chunk = case
    gen = torch.Generator().manual_seed(n * 31 + d)
    img, txt = paired_features(n, n, d, dtype=torch.float64, normalise=not renorm)
    if renorm:  # unnormalised rows of different norms: the prefix normalisation matters
        img = img * (0.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64))
    opts = _options(kind, n, d, torch.float64, gen)
    got = _run(img, txt, 9.0, dims, weights, renorm, opts, chunk)
    ref = _reference(img, txt, 9.0, dims, weights, renorm, opts)
    assert len(got) == len(ref)
    for name, g, r in zip(["loss", "d_img", "d_txt", "d_scale", "d_neg_txt", "d_neg_img"], got, ref):
        assert _rel(g, r) <= 1e-9, (name, _rel(g, r))


def _confident(n, d, seed, dtype):
    """Scale-100 rows whose pair dominates at every size: per-size losses ~1e-4 and below."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    t = x + 0.05 * torch.randn(n, d, dtype=torch.float64, generator=g)
    return x.to(dtype), t.to(dtype), 100.0


def _random(n, d, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    return x.to(dtype), (0.6 * x + 0.8 * torch.randn(n, d, dtype=torch.float64, generator=g)).to(dtype), 20.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("make", [_random, _confident], ids=["random", "confident"])
@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "raw"])
def test_precision_rule(dtype, make, renorm):
    """Each output's error against float64 (of the dtype-rounded inputs) is within FACTOR of
    the materialised per-size losses' error in the same dtype, over 4 seeds (``seed_ratio``)."""
    check_precision(dtype, make, renorm, backend="torch")


def check_precision(dtype, make, renorm, backend):
    """``test_precision_rule``'s check on ``backend`` (strips of 16 rows on the torch backend)."""
    dims, n, d = (7, 20, 33), 41, 33
    errors, floors = {}, {}
    for seed in range(4):
        img, txt, scale = make(n, d, seed, dtype)
        if not renorm and make is _confident:  # raw prefixes: keep |S| of size scale at the largest size
            img = torch.nn.functional.normalize(img.double(), dim=1).to(dtype)
        got = _run(img, txt, scale, dims, None, renorm, {}, chunk_size=16, backend=backend)
        ref = _reference(img.double(), txt.double(), scale, dims, None, renorm, {})
        mat = _reference(img, txt, scale, dims, None, renorm, {}, dtype=dtype)
        for i, (g, r, m) in enumerate(zip(got, ref, mat)):
            errors.setdefault(i, []).append(float((g - r).norm()))
            floors.setdefault(i, []).append(max(float((m - r).norm()), UNIT[dtype] * float(r.norm())))
    for i, name in enumerate(["loss", "d_img", "d_txt", "d_scale"]):
        assert seed_ratio(errors[i], floors[i]) <= FACTOR, (name, errors[i], floors[i])


def test_module_and_autocast():
    """FastClipLoss takes the options and gives clip_loss's value; under CPU autocast (bf16)
    the loss is float32 and equals the loss of the bf16-cast features."""
    img, txt = paired_features(19, 19, 24, dtype=torch.float32, normalise=False)
    module = clip_fast.FastClipLoss(matryoshka_dims=(24, 8), matryoshka_weights=(1.0, 3.0))
    assert "matryoshka_dims=(8, 24)" in repr(module)
    want = clip_fast.clip_loss(img, txt, 10.0, matryoshka_dims=(8, 24), matryoshka_weights=(3.0, 1.0))
    assert torch.equal(module(img, txt, 10.0), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = clip_fast.clip_loss(img, txt, 10.0, matryoshka_dims=(8, 24))
    assert got.dtype == torch.float32
    cast = clip_fast.clip_loss(img.bfloat16(), txt.bfloat16(), torch.tensor(10.0), matryoshka_dims=(8, 24))
    assert torch.allclose(got, cast.float(), rtol=1e-2)
    ref = reference_matryoshka_loss(img.bfloat16(), txt.bfloat16(), 10.0, (8, 24))[0]
    assert abs(float(got) - float(ref)) <= 1e-4 * abs(float(ref))


@pytest.mark.parametrize("kwargs, match", [
    (dict(matryoshka_dims=()), "matryoshka_dims must be a non-empty"),
    (dict(matryoshka_dims=64), "matryoshka_dims must be a non-empty"),
    (dict(matryoshka_dims=(4, 2.5)), "matryoshka_dims must hold ints"),
    (dict(matryoshka_dims=(4, 17)), r"\[1, D\] = \[1, 16\].*\(4, 17\)"),
    (dict(matryoshka_dims=(0, 4)), r"\[1, D\] = \[1, 16\]"),
    (dict(matryoshka_dims=(4, 4)), "must be distinct"),
    (dict(matryoshka_dims=(4, 8), matryoshka_weights=(1.0,)), "sequence of 2 floats"),
    (dict(matryoshka_dims=(4, 8), matryoshka_weights=(1.0, float("nan"))), "finite floats"),
    (dict(matryoshka_dims=(4, 8), matryoshka_renormalize="yes"), "matryoshka_renormalize must be a bool"),
    (dict(matryoshka_dims=(4, 8), backend="cuda"), "backend='triton' or backend='torch'"),
])
def test_bad_options(kwargs, match):
    img, txt = paired_features(6, 6, 16)
    with pytest.raises((ValueError, TypeError), match=match):
        clip_fast.clip_loss(img, txt, 10.0, **kwargs)


def test_distributed_nested_backend_choice():
    """The distributed modes' nested sweep: backend="triton" runs the Triton pair, "auto" takes
    the plain loss's choice (torch on CPU), "torch" stays torch; the module takes
    backend="triton" with world_size > 1 and refuses backend="cuda" (no nested CUDA sweep)."""
    from clip_fast.clip.distributed.agreement import _local_call

    img, txt = paired_features(6, 6, 16)
    auto = clip_fast.clip.backends.resolve_backend("auto", img.device, img.dtype).NAME
    for backend, want in (("triton", "triton"), ("torch", "torch"), ("auto", auto)):
        call, nested = _local_call(img, txt, 10.0, None, "gather", True, True, backend, None, "gloo", {},
                                   ((4, 16), None, True))
        assert call.opts.backend == want and nested.dims == (4, 16), (backend, call.opts.backend)
    assert auto == "torch" or torch.cuda.is_available()
    clip_fast.FastClipLoss(world_size=2, rank=0, matryoshka_dims=(4, 8), backend="triton")
    with pytest.raises(ValueError, match="backend='triton' or backend='torch'"):
        clip_fast.FastClipLoss(world_size=2, rank=0, matryoshka_dims=(4, 8), backend="cuda")
    with pytest.raises(ValueError, match="backend='triton' or backend='torch'"):
        _local_call(img, txt, 10.0, None, "gather", True, True, "cuda", None, "gloo", {}, ((4, 16), None, True))


@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "raw"])
def test_gemm_work_is_the_largest_size(renorm):
    """Each sweep multiplies each K segment once: 4 products of N x N x D_max in all (the
    forward, the backward's recompute of S, d_img and d_txt; strips of 7 rows), where the
    per-size loop does 4 of N x N x sum(dims)."""
    n, d, dims = 40, 29, (5, 13, 29)
    img, txt = paired_features(n, n, d, normalise=False)
    x, y = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    with _GemmFlops() as nested:
        clip_fast.clip_loss(x, y, 10.0, matryoshka_dims=dims, matryoshka_renormalize=renorm,
                            chunk_size=7).backward()
    assert nested.flops == 4 * 2 * n * n * max(dims)
    with _GemmFlops() as loop:
        sum(clip_fast.clip_loss(torch.nn.functional.normalize(x[:, :k], dim=1),
                                torch.nn.functional.normalize(y[:, :k], dim=1), 10.0, backend="torch")
            for k in dims).backward()
    assert loop.flops == 4 * 2 * n * n * sum(dims)
