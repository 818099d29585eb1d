"""The Matryoshka (nested-size) SigLIP loss in one sweep against separate float64 losses.

Oracle: ``reference.reference_matryoshka_siglip_loss``, open_clip's SigLipLoss materialised
once per size with autograd through the prefix normalisation (no clip_fast code).  float64:
the loss and the gradients of both features, logit_scale and logit_bias to 1e-9 relative;
float32 / bfloat16: the precision rule (tests/helpers.py) against the same materialised
losses run in float32 (bfloat16 inputs are swept in float32), including confident rows at scale 100 and raw prefixes with
|S| up to ~2500.  Sizes that are not multiples of anything (4, 11, 27 of D = 27; 19, 6 of
D = 31) and strips of a few rows (``chunk_size``), so the sweep crosses strip and segment
boundaries.  Covers the torch sweep and the Triton kernel (under the interpreter on CPU).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from helpers import DTYPE_UNIT as UNIT, GemmFlops, PRECISION_FACTOR as FACTOR, paired_features, seed_ratio
from reference import reference_matryoshka_siglip_loss

import clip_fast

NAMES = ("loss", "d_img", "d_txt", "d_scale", "d_bias")


def _run(img, txt, scale, bias, dims, weights=None, renorm=True, ids=None, chunk_size=None, backend="auto"):
    """clip_fast's loss and the gradients of (img, txt, scale[, bias]), as float64."""
    sdt = torch.float64 if img.dtype == torch.float64 else torch.float32
    leaves = [img.clone().requires_grad_(True), txt.clone().requires_grad_(True),
              torch.tensor(scale, dtype=sdt, requires_grad=True)]
    if bias is not None:
        leaves.append(torch.tensor(bias, dtype=sdt, requires_grad=True))
    loss = clip_fast.siglip_loss(*leaves[:3], leaves[3] if bias is not None else None, group_ids=ids,
                                 matryoshka_dims=dims, matryoshka_weights=weights,
                                 matryoshka_renormalize=renorm, chunk_size=chunk_size, backend=backend)
    return [loss.detach().double()] + [g.double() for g in torch.autograd.grad(loss, leaves)]


def _reference(img, txt, scale, bias, dims, weights=None, renorm=True, ids=None, dtype=torch.float64):
    ref = reference_matryoshka_siglip_loss(img, txt, scale, dims, weights, renorm, bias, ids, dtype=dtype)
    return [t.double() for t in ref if t is not None]


def _rel(got, ref):
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


# (n, d, dims, weights, chunk_size): odd sizes, strips of a few rows.
CASES_64 = [(21, 27, (4, 11, 27), (1.0, 0.25, 3.0), 6),
            (15, 31, (19, 6), None, 4),      # unsorted sizes, the largest below D
            (7, 9, (9,), None, None)]        # one size: the plain loss of the normalised features


@pytest.mark.parametrize("ids", [False, True], ids=["diag", "groups"])
@pytest.mark.parametrize("bias", [None, -4.0], ids=["nobias", "bias"])
@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("case", CASES_64, ids=["odd3", "unsorted", "single"])
def test_float64_equals_separate_losses(case, renorm, bias, ids):
    n, d, dims, weights, chunk = case
    gen = torch.Generator().manual_seed(n * 31 + d)
    img, txt = paired_features(n, n, d, dtype=torch.float64, normalise=not renorm)
    if renorm:  # rows of different norms: the prefix normalisation matters
        img = img * (0.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64))
    group_ids = torch.randint(0, max(2, n // 3), (n,), generator=gen) if ids else None
    got = _run(img, txt, 9.0, bias, dims, weights, renorm, group_ids, chunk)
    ref = _reference(img, txt, 9.0, bias, dims, weights, renorm, group_ids)
    assert len(got) == len(ref)
    for name, g, r in zip(NAMES, got, ref):
        assert _rel(g, r) <= 1e-9, (name, _rel(g, r))


def _random(n, d, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    t = 0.6 * x + 0.8 * torch.randn(n, d, dtype=torch.float64, generator=g)
    return x.to(dtype), t.to(dtype), 10.0, -3.0


def _confident(n, d, seed, dtype):
    """Scale 100, bias -50, each text next to its image at every size: S ~ +50 on the
    positives and mostly far below 0 on the negatives, so most terms are e^-50 and less."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    t = x + 0.05 * torch.randn(n, d, dtype=torch.float64, generator=g)
    return x.to(dtype), t.to(dtype), 100.0, -50.0


def _large(n, d, seed, dtype):
    """Rows of norm 5 at scale 100 and bias 2.5: raw prefixes give |S| up to ~2500."""
    x, t, _, _ = _confident(n, d, seed, torch.float64)
    return (5 * x).to(dtype), (5 * F.normalize(t, dim=1)).to(dtype), 100.0, 2.5


_MAKERS = {"random": _random, "confident": _confident, "large": _large}
_BF16 = torch.bfloat16
# The torch sweep in every case; the Triton kernel (the interpreter on CPU, whose tl.dot
# upcasts bf16 operands to fp32 exactly) in fp32 on every case and in bf16 on the largest |S|.
PRECISION_CASES = [pytest.param(b, dt, m, id=f"{b}-{name}-{m}")
                   for b in ("torch", "triton") for dt, name in ((torch.float32, "fp32"), (_BF16, "bf16"))
                   for m in _MAKERS if b == "torch" or dt == torch.float32 or m == "large"]


@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("backend, dtype, make", PRECISION_CASES)
def test_precision_rule(backend, dtype, make, renorm):
    """Each output's error against float64 (of the dtype-rounded inputs) is within FACTOR of
    the materialised per-size losses' error in the same dtype, over 4 seeds (``seed_ratio``).
    bfloat16 inputs are swept in float32, so they are held to the float32 materialised loss of
    the same bf16-rounded inputs (stricter than the bf16 one), with a floor of one bfloat16
    unit: the loss and the gradients are returned rounded to bfloat16."""
    dims, n, d = (7, 20, 33), 41, 33
    make = _MAKERS[make]
    mat_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    errors, floors = {}, {}
    for seed in range(4):
        img, txt, scale, bias = make(n, d, seed, dtype)
        got = _run(img, txt, scale, bias, dims, None, renorm, chunk_size=16, backend=backend)
        ref = _reference(img.double(), txt.double(), scale, bias, dims, None, renorm)
        mat = _reference(img, txt, scale, bias, dims, None, renorm, dtype=mat_dtype)
        for i, (g, r, m) in enumerate(zip(got, ref, mat)):
            errors.setdefault(i, []).append(float((g - r).norm()))
            floors.setdefault(i, []).append(max(float((m - r).norm()), UNIT[dtype] * float(r.norm())))
    for i, name in enumerate(NAMES):
        assert seed_ratio(errors[i], floors[i]) <= FACTOR, (name, errors[i], floors[i])


def test_module_no_grad_and_autocast():
    """FastSigLipLoss takes the options and gives siglip_loss's value; a forward without
    gradients gives the same loss; under CPU autocast (bf16) the loss is float32 and is the
    loss of the bf16-cast features."""
    img, txt = paired_features(19, 19, 24, dtype=torch.float32, normalise=False)
    module = clip_fast.FastSigLipLoss(matryoshka_dims=(24, 8), matryoshka_weights=(1.0, 3.0))
    assert "matryoshka_dims=(8, 24)" in repr(module)
    want = clip_fast.siglip_loss(img, txt, 10.0, -2.0, matryoshka_dims=(8, 24), matryoshka_weights=(3.0, 1.0))
    assert torch.equal(module(img, txt, 10.0, -2.0), want)
    x = img.clone().requires_grad_(True)
    assert torch.equal(clip_fast.siglip_loss(x, txt, 10.0, -2.0, matryoshka_dims=(8, 24),
                                             matryoshka_weights=(3.0, 1.0)).detach(), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = clip_fast.siglip_loss(img, txt, 10.0, -2.0, matryoshka_dims=(8, 24))
    assert got.dtype == torch.float32
    ref = reference_matryoshka_siglip_loss(img.bfloat16(), txt.bfloat16(), 10.0, (8, 24), bias=-2.0)[0]
    assert abs(float(got) - float(ref)) <= 1e-5 * abs(float(ref))


@pytest.mark.parametrize("kwargs, match", [
    (dict(matryoshka_dims=()), "matryoshka_dims must be a non-empty"),
    (dict(matryoshka_dims=(4, 2.5)), "matryoshka_dims must hold ints"),
    (dict(matryoshka_dims=(4, 17)), r"\[1, D\] = \[1, 16\].*\(4, 17\)"),
    (dict(matryoshka_dims=(4, 4)), "must be distinct"),
    (dict(matryoshka_dims=(4, 8), matryoshka_weights=(1.0,)), "sequence of 2 floats"),
    (dict(matryoshka_dims=(4, 8), matryoshka_renormalize=1), "matryoshka_renormalize must be a bool"),
    (dict(matryoshka_dims=(4, 8), backend="cuda"), r"matryoshka_dims.*backend='torch'.*'cuda'"),
])
def test_bad_options(kwargs, match):
    img, txt = paired_features(6, 6, 16)
    with pytest.raises((ValueError, TypeError), match=match):
        clip_fast.siglip_loss(img, txt, 10.0, -1.0, **kwargs)


def test_module_bad_options():
    with pytest.raises(ValueError, match=r"matryoshka_dims.*backend='cuda'"):
        clip_fast.FastSigLipLoss(matryoshka_dims=(4, 8), backend="cuda")
    with pytest.raises(ValueError, match="must be distinct"):
        clip_fast.FastSigLipLoss(matryoshka_dims=(4, 4))
    img, txt = paired_features(6, 6, 16)
    with pytest.raises(ValueError, match=r"\[1, D\] = \[1, 16\]"):
        clip_fast.FastSigLipLoss(matryoshka_dims=(4, 32))(img, txt, 10.0, -1.0)


@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "raw"])
def test_gemm_work_is_the_largest_size(renorm):
    """One sweep multiplies each K segment once in each of its 3 products (S, d_img, d_txt):
    3 products of N x N x D_max, where the per-size loop does 3 of N x N x sum(dims)."""
    n, d, dims = 40, 29, (5, 13, 29)
    img, txt = paired_features(n, n, d, normalise=False)
    x, y = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    with GemmFlops() as nested:
        clip_fast.siglip_loss(x, y, 10.0, -1.0, matryoshka_dims=dims, matryoshka_renormalize=renorm,
                              chunk_size=7).backward()
    assert nested.flops == 3 * 2 * n * n * max(dims)
    with GemmFlops() as loop:
        sum(clip_fast.siglip_loss(F.normalize(x[:, :k], dim=1), F.normalize(y[:, :k], dim=1), 10.0, -1.0,
                                  backend="torch") for k in dims).backward()
    assert loop.flops == 3 * 2 * n * n * sum(dims)


@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "raw"])
def test_triton_many_blocks_and_no_grad(monkeypatch, renorm):
    """The Triton sweep over a workspace of a few tiles (2 x 2 blocks, the host's per-block
    GEMMs), group ids and sizes across BK slices, against the float64 reference within the
    fp32 precision rule; a forward without gradients gives the same loss."""
    monkeypatch.setenv("CLIP_FAST_WORKSPACE_MB", "0.004")
    n, d, dims = 45, 37, (6, 35, 19)
    img, txt = paired_features(n, n, d, normalise=not renorm)
    ids = torch.randint(0, 9, (n,), generator=torch.Generator().manual_seed(5))
    got = _run(img, txt, 20.0, -6.0, dims, (0.5, 1.0, 2.0), renorm, ids, backend="triton")
    ref = _reference(img.double(), txt.double(), 20.0, -6.0, dims, (0.5, 1.0, 2.0), renorm, ids)
    mat = _reference(img, txt, 20.0, -6.0, dims, (0.5, 1.0, 2.0), renorm, ids, dtype=torch.float32)
    for name, g, r, m in zip(NAMES, got, ref, mat):
        floor = max(float((m - r).norm()), UNIT[torch.float32] * float(r.norm()))
        assert float((g - r).norm()) <= FACTOR * floor, (name, float((g - r).norm()), floor)
    with torch.no_grad():
        loss = clip_fast.siglip_loss(img, txt, 20.0, -6.0, group_ids=ids, matryoshka_dims=dims,
                                     matryoshka_weights=(0.5, 1.0, 2.0), matryoshka_renormalize=renorm,
                                     backend="triton")
    assert abs(float(loss) - float(got[0])) <= 1e-6 * abs(float(got[0]))  # fp32 loss, float64 atomics in any order


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_triton_nested_kernel_compiles_for_sm90(dtype):
    """The nested tile kernel's declared variants (both normalisations) through Triton's full
    compiler for sm_90, no GPU (the route ``python -m clip_fast.kernels.aot_check`` takes)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the kernel was decorated under the interpreter; run with TRITON_INTERPRET=0")
    from clip_fast.kernels import aot_check, siglip

    variants = [v for v in siglip.aot_variants(dtype, 90) if v.kernel is siglip._nested_siglip_tile_kernel]
    assert sorted(v.constexprs["RENORM"] for v in variants) == [False, True]
    for variant in variants:
        assert aot_check.compile_variant(variant, arch=90).asm["cubin"]



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) of the module with Matryoshka sizes: the same loss and
    gradients as eager (the Triton sweep is an opaque custom op with a fake)."""
    mod = clip_fast.FastSigLipLoss(backend=backend, matryoshka_dims=(5, 17), matryoshka_weights=(2.0, 1.0))
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    img, txt = paired_features(24, 24, 17, normalise=False)
    outs = []
    for fn in (mod, compiled):
        leaves = [img.clone().requires_grad_(True), txt.clone().requires_grad_(True),
                  torch.tensor(10.0, requires_grad=True), torch.tensor(-4.0, requires_grad=True)]
        loss = fn(*leaves)
        outs.append([loss.detach()] + list(torch.autograd.grad(loss, leaves)))
    for what, a, b in zip(NAMES, *outs):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=what)
