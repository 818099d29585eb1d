"""The Triton nested (Matryoshka) sweep (``clip_fast.kernels.nested``) through
``clip_loss(..., backend="triton", matryoshka_dims=...)`` against separate losses per size.

Oracle: ``reference.reference_matryoshka_loss`` (one materialised loss per size, autograd
through the prefix normalisation, no clip_fast code).  float64 (the nested kernels accumulate
float64 operands in float64): loss and the gradients of img, txt, logit_scale (and hard
negatives) to 1e-9 relative.  float32 and bfloat16: the precision rule (tests/helpers.py)
against the materialised per-size losses in the same dtype, on random rows, confident rows at
scale 100 and raw prefixes with |S| up to ~10^3.  bfloat16 runs the kernels with bf16 operands
upcast to fp32 before tl.dot (exact; the interpreter's own bf16 tl.dot is broken), so it
covers the bf16 loads, the bf16 workspace of the backward and the host's bf16 GEMMs, not the
GPU's bf16 MMA.  Shapes: N = 37 or 41 (two 32-row blocks under the interpreter, the second
padded), D = 29 / 33, sizes (5, 13, 29) / (7, 20, 33) / (3, 17) of D = 30 -- none a multiple of
the tile's BK = 32, and the largest below D in one case.
"""
from __future__ import annotations

import pytest
import torch

from helpers import DTYPE_UNIT as UNIT, PRECISION_FACTOR as FACTOR, paired_features, seed_ratio
from reference import reference_matryoshka_loss

import clip_fast

pytest.importorskip("triton")


def _run(img, txt, scale, dims, weights, renorm, opts, backend="triton"):
    """clip_fast's loss and the gradients of (img, txt, scale, negatives), as float64."""
    leaves = {"img": img.clone().requires_grad_(True), "txt": txt.clone().requires_grad_(True),
              "scale": torch.tensor(scale, dtype=torch.float64 if img.dtype == torch.float64 else torch.float32,
                                    requires_grad=True)}
    opts = dict(opts)
    for k in ("negative_text_features", "negative_image_features"):
        if k in opts:
            opts[k] = leaves[k] = opts[k].clone().requires_grad_(True)
    loss = clip_fast.clip_loss(leaves["img"], leaves["txt"], leaves["scale"], matryoshka_dims=dims,
                               matryoshka_weights=weights, matryoshka_renormalize=renorm, backend=backend, **opts)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [loss.detach().double()] + [g.double() for g in grads]


def _reference(img, txt, scale, dims, weights, renorm, opts, dtype=torch.float64):
    kw = {k: v for k, v in opts.items() if not k.startswith("negative")}
    ref = reference_matryoshka_loss(img, txt, scale, dims, weights, renorm, dtype=dtype,
                                    negative_text=opts.get("negative_text_features"),
                                    negative_image=opts.get("negative_image_features"), **kw)
    return [t.double() for t in ref if t is not None]


def _rel(got, ref):
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


def _options(kind, n, d, gen):
    if kind == "plain":
        return {}
    if kind == "groups":
        return dict(group_ids=torch.randint(0, max(2, n // 3), (n,), generator=gen))
    if kind == "smooth_weight":
        return dict(label_smoothing=0.1, image_to_text_weight=0.3)
    if kind == "negatives":
        return dict(negative_text_features=torch.randn(5, d, generator=gen, dtype=torch.float64),
                    negative_image_features=torch.randn(3, d, generator=gen, dtype=torch.float64),
                    label_smoothing=0.05, group_ids=torch.randint(0, 4, (n,), generator=gen))
    raise ValueError(kind)


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
    opts = _options(kind, n, d, gen)
    got = _run(img, txt, 9.0, dims, weights, renorm, opts)
    ref = _reference(img, txt, 9.0, dims, weights, renorm, opts)
    assert len(got) == len(ref)
    for name, g, r in zip(["loss", "d_img", "d_txt", "d_scale", "d_neg_txt", "d_neg_img"], got, ref):
        assert _rel(g, r) <= 1e-9, (name, _rel(g, r))


def _random(n, d, seed, dtype, renorm):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    t = 0.6 * x + 0.8 * torch.randn(n, d, dtype=torch.float64, generator=g)
    if not renorm:
        x, t = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(t, dim=1)
    return x.to(dtype), t.to(dtype), 20.0


def _confident(n, d, seed, dtype, renorm):
    """Scale-100 rows whose pair dominates at every size: per-size losses ~1e-4 and below."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    t = x + 0.05 * torch.randn(n, d, dtype=torch.float64, generator=g)
    return x.to(dtype), t.to(dtype), 100.0


def _large(n, d, seed, dtype, renorm):
    """Raw prefixes of norm ~sqrt(d) at scale 30: |S| up to ~10^3."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    t = x + 0.3 * torch.randn(n, d, dtype=torch.float64, generator=g)
    return x.to(dtype), t.to(dtype), 30.0


PRECISION = [(torch.float32, _random, True), (torch.float32, _random, False),
             (torch.float32, _confident, True), (torch.float32, _confident, False),
             (torch.float32, _large, False),
             (torch.bfloat16, _random, True), (torch.bfloat16, _confident, False)]


@pytest.mark.parametrize("dtype, make, renorm", PRECISION,
                         ids=[f"{str(d)[6:]}-{m.__name__[1:]}-{'renorm' if r else 'raw'}" for d, m, r in PRECISION])
def test_precision_rule(dtype, make, renorm):
    """Each output's error against float64 (of the dtype-rounded inputs) is within FACTOR of the
    materialised per-size losses' error in the same dtype, over 4 seeds (``seed_ratio``)."""
    dims, n, d = (7, 20, 33), 41, 33
    errors, floors = {}, {}
    for seed in range(4):
        img, txt, scale = make(n, d, seed, dtype, renorm)
        got = _run(img, txt, scale, dims, None, renorm, {})
        ref = _reference(img.double(), txt.double(), scale, dims, None, renorm, {})
        mat = _reference(img, txt, scale, dims, None, renorm, {}, dtype=dtype)
        for i, (g, r, m) in enumerate(zip(got, ref, mat)):
            errors.setdefault(i, []).append(float((g - r).norm()))
            floors.setdefault(i, []).append(max(float((m - r).norm()), UNIT[dtype] * float(r.norm())))
    for i, name in enumerate(["loss", "d_img", "d_txt", "d_scale"]):
        assert seed_ratio(errors[i], floors[i]) <= FACTOR, (name, errors[i], floors[i])


@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "raw"])
def test_underflowed_columns_take_the_exact_fallback(renorm, monkeypatch):
    """Text rows opposed to every image row at scale 100: their columns' shifted sums underflow
    (2^(S2 + H2 - c2) with S2 ~ -c2), the transposed sweep recomputes them, and the loss and
    gradients stay the float64 reference's."""
    from clip_fast.kernels import nested

    n, d, dims = 37, 29, (5, 13, 29)
    g = torch.Generator().manual_seed(5)
    u = torch.nn.functional.normalize(torch.randn(d, dtype=torch.float64, generator=g), dim=0)
    img = u + 0.05 * torch.randn(n, d, dtype=torch.float64, generator=g)
    txt = img + 0.05 * torch.randn(n, d, dtype=torch.float64, generator=g)
    txt[[3, 20, 36]] = -img[[3, 20, 36]] + 0.05 * torch.randn(3, d, dtype=torch.float64, generator=g)
    if not renorm:
        img, txt = torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(txt, dim=1)
    flagged = []
    launch = nested._launch_sweep

    def spy(x, y, dims_t, rs, c, c2, row_flags, *rest):
        if row_flags is not None:
            flagged.append(int(row_flags.sum()))
        return launch(x, y, dims_t, rs, c, c2, row_flags, *rest)

    monkeypatch.setattr(nested, "_launch_sweep", spy)
    got = _run(img, txt, 100.0, dims, None, renorm, {})
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
