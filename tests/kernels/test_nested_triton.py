"""The Triton nested (Matryoshka) sweep (``clip_fast.kernels.nested``) through
``clip_loss(..., backend="triton", matryoshka_dims=...)`` against separate losses per size.

Oracle: ``reference.reference_matryoshka_loss`` (one materialised loss per size, autograd
through the prefix normalisation, no clip_fast code).  float64 (the nested kernels accumulate
float64 operands in float64): loss and the gradients of img, txt, logit_scale (and hard
negatives) to 1e-9 relative.  float32 and bfloat16: the precision rule (tests/helpers.py)
against the materialised per-size losses in the same dtype, on random rows, confident rows at
scale 100 and raw prefixes with |S| up to ~10^3 (the torch backend's tests' runner and inputs,
tests/clip/test_matryoshka.py).  bfloat16 runs the kernels with bf16 operands upcast to fp32
before tl.dot (exact; the interpreter's own bf16 tl.dot is broken), so it covers the bf16
loads, the bf16 workspace of the backward and the host's bf16 GEMMs, not the GPU's bf16 MMA.
Shapes: N = 37 or 41 (two 32-row blocks under the interpreter, the second padded), D = 29 / 33,
sizes (5, 13, 29) / (7, 20, 33) / (3, 17) of D = 30 -- none a multiple of the tile's BK = 32,
and the largest below D in one case.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from helpers import paired_features

import clip_fast

pytest.importorskip("triton")
# The torch backend's Matryoshka tests: their runner, options and input makers serve both.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clip"))
from test_matryoshka import (_confident, _GemmFlops, _options, _random, _reference, _rel, _run,  # noqa: E402
                             check_precision)


CASES = [
    # (n, d, dims, weights, renorm, options)
    (37, 29, (5, 13, 29), (1.0, 0.5, 2.0), True, "plain"),
    (37, 29, (5, 13, 29), (1.0, 0.5, 2.0), False, "plain"),
    (17, 30, (17, 3), None, True, "plain"),      # unsorted sizes, the largest below D
    (17, 30, (17, 3), None, False, "plain"),
    (9, 8, (8,), None, True, "plain"),           # one size: the plain loss of the normalised features
    (37, 29, (5, 13, 29), None, True, "groups"),
    (37, 29, (5, 13, 29), (2.0, 1.0, 0.5), False, "smooth_weight"),
    (23, 29, (5, 29), None, True, "negatives"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"n{c[0]}-{len(c[2])}sizes-{'renorm' if c[4] else 'raw'}-{c[5]}"
                                             for c in CASES])
def test_float64_equals_separate_losses(case):
    n, d, dims, weights, renorm, kind = case
    gen = torch.Generator().manual_seed(n * 31 + d)
    img, txt = paired_features(n, n, d, dtype=torch.float64, normalise=not renorm)
    if renorm:  # rows of different norms: the prefix normalisation matters
        img = img * (0.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64))
    opts = _options(kind, n, d, torch.float64, gen)
    got = _run(img, txt, 9.0, dims, weights, renorm, opts, backend="triton")
    ref = _reference(img, txt, 9.0, dims, weights, renorm, opts)
    assert len(got) == len(ref)
    for name, g, r in zip(["loss", "d_img", "d_txt", "d_scale", "d_neg_txt", "d_neg_img"], got, ref):
        assert _rel(g, r) <= 1e-9, (name, _rel(g, r))


# (dtype, inputs, re-normalised): _random at scale 20, raw prefixes of norm ~sqrt(D), is the
# large-|S| case (|S| up to ~10^3); _confident at scale 100 (raw: unit image rows).
PRECISION = [(torch.float32, _random, True), (torch.float32, _random, False),
             (torch.float32, _confident, True), (torch.float32, _confident, False),
             (torch.bfloat16, _random, True), (torch.bfloat16, _confident, False)]


@pytest.mark.parametrize("dtype, make, renorm", PRECISION,
                         ids=[f"{str(d)[6:]}-{m.__name__[1:]}-{'renorm' if r else 'raw'}" for d, m, r in PRECISION])
def test_precision_rule(dtype, make, renorm):
    """Each output's error against float64 (of the dtype-rounded inputs) is within FACTOR of the
    materialised per-size losses' error in the same dtype, over 4 seeds (``seed_ratio``)."""
    check_precision(dtype, make, renorm, backend="triton")


def _spy_fallback(monkeypatch):
    """The number of flagged rows of each fallback launch (the transposed sweep), as a list."""
    from clip_fast.kernels import nested

    flagged = []
    launch = nested._launch_sweep

    def spy(x, y, dims_t, rs, c, c2, row_flags, *rest):
        if row_flags is not None:
            flagged.append(int(row_flags.sum()))
        return launch(x, y, dims_t, rs, c, c2, row_flags, *rest)

    monkeypatch.setattr(nested, "_launch_sweep", spy)
    return flagged


@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "raw"])
def test_underflowed_columns_take_the_exact_fallback(renorm, monkeypatch):
    """Text rows opposed to every image row at scale 100: their columns' shifted sums underflow
    (2^(S2 + H2 - c2) with S2 ~ -c2), the transposed sweep recomputes them, and the loss and
    gradients stay the float64 reference's."""
    n, d, dims = 37, 29, (5, 13, 29)
    g = torch.Generator().manual_seed(5)
    u = torch.nn.functional.normalize(torch.randn(d, dtype=torch.float64, generator=g), dim=0)
    img = u + 0.05 * torch.randn(n, d, dtype=torch.float64, generator=g)
    txt = img + 0.05 * torch.randn(n, d, dtype=torch.float64, generator=g)
    txt[[3, 20, 36]] = -img[[3, 20, 36]] + 0.05 * torch.randn(3, d, dtype=torch.float64, generator=g)
    if not renorm:
        img, txt = torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(txt, dim=1)
    flagged = _spy_fallback(monkeypatch)
    got = _run(img, txt, 100.0, dims, None, renorm, {}, backend="triton")
    ref = _reference(img, txt, 100.0, dims, None, renorm, {})
    assert flagged and flagged[0] >= 3
    for name, a, b in zip(["loss", "d_img", "d_txt", "d_scale"], got, ref):
        assert _rel(a, b) <= 1e-9, (name, _rel(a, b))


def test_dispatch():
    """``nested_ops`` names the two sweeps; auto takes the plain loss's backend (torch on CPU);
    backend="cuda" is refused naming the backends that have the sweep."""
    from clip_fast.clip.backends import nested_ops, nested_torch
    from clip_fast.kernels import nested

    assert nested_ops("torch") == (nested_torch.nested_lse_forward, nested_torch.nested_grad_backward)
    assert nested_ops("triton") == (nested.nested_lse_forward, nested.nested_grad_backward)
    img, txt = paired_features(9, 9, 12)
    auto = clip_fast.clip_loss(img, txt, 10.0, matryoshka_dims=(4, 12))
    assert torch.equal(auto, clip_fast.clip_loss(img, txt, 10.0, matryoshka_dims=(4, 12), backend="torch"))
    tri = clip_fast.clip_loss(img, txt, 10.0, matryoshka_dims=(4, 12), backend="triton")
    assert abs(float(tri) - float(auto)) <= 1e-5 * abs(float(auto))
    for call in (lambda: clip_fast.clip_loss(img, txt, 10.0, matryoshka_dims=(4, 12), backend="cuda"),
                 lambda: clip_fast.FastClipLoss(backend="cuda", matryoshka_dims=(4, 12))):
        with pytest.raises(ValueError, match="matryoshka_dims.*backend='triton' or backend='torch'"):
            call()


def test_backward_gemm_work_is_the_largest_size():
    """The backward's host GEMMs multiply each segment once: d_img and d_txt cost 2 products of
    N x N x D_max in all (the sweeps themselves are Triton kernels, not aten products)."""
    n, d, dims = 40, 29, (5, 13, 29)
    img, txt = paired_features(n, n, d, normalise=False)
    x, y = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    with _GemmFlops() as nested:
        clip_fast.clip_loss(x, y, 10.0, matryoshka_dims=dims, backend="triton").backward()
    assert nested.flops == 2 * 2 * n * n * max(dims)


# Rectangular blocks (the distributed modes' gather and ring blocks): (M, K) both ways round,
# odd sizes, sizes not multiples of BK; the label-pair block and the ring's blocks without
# label pairs (the row term or the column term alone, w = 0).
RECT = [(37, 23, 29, (5, 13, 29)), (23, 37, 29, (5, 13, 29)), (1, 9, 30, (17, 3)), (40, 7, 33, (7, 20, 33))]
COEFS = {"pairs": (0.02, 0.03, 0.05), "row_only": (0.04, 0.0, 0.0), "col_only": (0.0, 0.03, 0.0)}


def _pair_outputs(backend, img, txt, scale, dims, renorm, coefs):
    """Both sweeps of ``nested_ops(backend)`` on one (M, K) block, called as the distributed
    modes call them (``sweeps.NestedSweeps``): the forward's stats, then the backward's outputs
    with the given per-size (coef_row, coef_col, coef_diag) and the forward's diagonal."""
    from clip_fast.clip.backends import nested_ops
    from clip_fast.clip.matryoshka import check_matryoshka, sweep_operands

    forward, backward = nested_ops(backend)
    nested = check_matryoshka(dims, None, renorm, img.shape[1])
    s = torch.tensor(scale, dtype=img.dtype)
    x_gemm, rs, r, c, _, _ = sweep_operands(img, txt, s, nested)
    stats = forward(x_gemm, txt, nested.dims, rs, c, None)
    a, b, w = coefs
    ns = len(dims)
    lse_row = stats[0] if a else torch.zeros_like(stats[0])
    lse_col = stats[1] if b else torch.zeros_like(stats[1])
    grads = backward(x_gemm, img, txt, s, nested.dims, rs, r, c, lse_row, lse_col, stats[2],
                     ([a] * ns, [b] * ns, [w] * ns), chunk_size=None)
    return list(stats) + list(grads)


OUT_NAMES = ["lse_row", "lse_col", "diag", "d_x", "d_y", "u_row", "u_col", "d_scale"]


@pytest.mark.parametrize("coefs", list(COEFS), ids=list(COEFS))
@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("rect", RECT, ids=[f"{m}x{k}" for m, k, _, _ in RECT])
def test_rectangular_pair_equals_torch_pair_float64(rect, renorm, coefs):
    """float64: the Triton pair's statistics and gradients are the torch pair's (nested_torch,
    the contract's reference) to 1e-9 relative, shapes included."""
    m, k, d, dims = rect
    gen = torch.Generator().manual_seed(m * 7 + k)
    img = torch.randn(m, d, dtype=torch.float64, generator=gen)
    txt = torch.randn(k, d, dtype=torch.float64, generator=gen)
    got = _pair_outputs("triton", img, txt, 7.0, dims, renorm, COEFS[coefs])
    ref = _pair_outputs("torch", img, txt, 7.0, dims, renorm, COEFS[coefs])
    for name, g, r in zip(OUT_NAMES, got, ref):
        assert g.shape == r.shape, (name, g.shape, r.shape)
        if name in ("u_row", "u_col") and not renorm:
            assert not g.any() and not r.any(), name   # no normalisation chain without re-normalisation
            continue
        assert _rel(g.double(), r.double()) <= 1e-9, (name, _rel(g.double(), r.double()))


@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("rect", RECT[:2], ids=[f"{m}x{k}" for m, k, _, _ in RECT[:2]])
def test_rectangular_pair_fp32_confident(rect, renorm):
    """float32, confident rows at scale 100 (each row's pair dominates at every size): the
    per-pair loss terms lse - diag (~1e-4 and below) and the gradients of the two pairs agree
    with the float64 torch pair's within the same error as the fp32 torch pair's, times the
    precision factor (tests/helpers.py)."""
    from helpers import PRECISION_FACTOR

    m, k, d, dims = rect
    n = min(m, k)
    gen = torch.Generator().manual_seed(m + 3 * k)
    base = torch.nn.functional.normalize(torch.randn(max(m, k), d, dtype=torch.float64, generator=gen), dim=1)
    img = base[:m].clone()
    txt = base[:k] + 0.05 * torch.randn(k, d, dtype=torch.float64, generator=gen)
    ref = _pair_outputs("torch", img, txt, 100.0, dims, renorm, COEFS["pairs"])
    outs = {b: _pair_outputs(b, img.float(), txt.float(), 100.0, dims, renorm, COEFS["pairs"])
            for b in ("triton", "torch")}

    def terms(o):   # the per-pair loss terms of every size, then the gradients
        return [o[0][:, :n] - o[2], o[1][:, :n] - o[2]] + [t.double() for t in o[3:]]

    ref_t = terms(ref)
    for i, (g, t, r) in enumerate(zip(terms(outs["triton"]), terms(outs["torch"]), ref_t)):
        if not r.any():
            continue
        err, floor = float((g - r).norm()), float((t - r).norm())
        assert err <= PRECISION_FACTOR * floor + 1e-12 * float(r.norm()), (i, err, floor)


@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("m, k", [(37, 23), (23, 37)], ids=["37x23", "23x37"])
def test_rectangular_fallback_equals_torch_pair(m, k, renorm, monkeypatch):
    """Text rows opposed to every image row at scale 100 on a rectangular block: their columns'
    shifted sums underflow, the transposed sweep (K rows against M columns) recomputes them,
    and the statistics and gradients stay the torch pair's to 1e-9 in float64."""
    d, dims = 29, (5, 13, 29)
    g = torch.Generator().manual_seed(m + k)
    u = torch.nn.functional.normalize(torch.randn(d, dtype=torch.float64, generator=g), dim=0)
    img = u + 0.05 * torch.randn(m, d, dtype=torch.float64, generator=g)
    txt = u + 0.05 * torch.randn(k, d, dtype=torch.float64, generator=g)
    txt[[3, 20, k - 1]] = -u + 0.05 * torch.randn(3, d, dtype=torch.float64, generator=g)
    if not renorm:
        img, txt = torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(txt, dim=1)
    flagged = _spy_fallback(monkeypatch)
    got = _pair_outputs("triton", img, txt, 100.0, dims, renorm, COEFS["pairs"])
    ref = _pair_outputs("torch", img, txt, 100.0, dims, renorm, COEFS["pairs"])
    assert flagged and flagged[0] >= 3
    for name, a, b in zip(OUT_NAMES, got, ref):
        if name in ("u_row", "u_col") and not renorm:
            continue
        assert _rel(a.double(), b.double()) <= 1e-9, (name, _rel(a.double(), b.double()))
