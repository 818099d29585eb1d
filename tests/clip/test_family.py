"""The CLIP loss family on one process: positive groups, label smoothing, direction weights
and hard negatives, alone and together, in every backend that runs here, against the
float64 materialised reference (tests/reference.py, reference_family_loss).

Two kinds of check:
- fp32 and float64 values on odd and round shapes (tolerances relative to the terms that
  cancel, as in test_core);
- flash-attention's precision rule in fp32, bf16 and fp16, as in test_exactness: the error
  against float64 is at most FACTOR x the materialised PyTorch loss's error in that dtype
  (soft-target cross-entropy, all in that dtype), including confident rows at scale 100.

bf16 under the Triton interpreter: its bf16 ``tl.dot`` is broken, so the kernels upcast
bf16 tiles to fp32 (exact for bf16 values); these tests cover bf16 loads, the fp32 epilogue
and the bf16 workspace, not the bf16 MMA (the gpu-marked cuda/triton runs do).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from reference import family_targets, reference_family_loss  # noqa: E402

import clip_fast  # noqa: E402
from helpers import DTYPE_UNIT as UNIT, PRECISION_FACTOR as FACTOR, backend_params  # noqa: E402
from clip_fast.clip import backends  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAMES = ("loss", "d_img", "d_txt", "d_scale", "d_neg_txt", "d_neg_img")


def _skip_unless(backend, dtype):
    reason = backends.unavailable_reason(backend, DEV, dtype)
    if reason is not None:
        pytest.skip(reason)


# ---- cases: float64 inputs and options, each from its own generator ----

def _case(n, d, *, seed, noise=0.5, scale=30.0, bias=None, n_groups=None, eps=0.0, lam=0.5,
          m_txt=None, m_img=None, norm=1.0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    t = F.normalize(x + noise * torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)

    def neg(m):
        if m is None:
            return None
        return norm * F.normalize(torch.randn(m, d, dtype=torch.float64, generator=g), dim=1)

    ids = None if n_groups is None else torch.randint(0, n_groups, (n,), generator=g)
    return dict(img=norm * x, txt=norm * t, scale=scale, bias=bias, ids=ids, eps=eps, lam=lam,
                neg_txt=neg(m_txt), neg_img=neg(m_img))


OPTIONS = {
    "groups": dict(n_groups=6),
    "groups_all_one": dict(n_groups=1),
    "smoothing": dict(eps=0.1),
    "weight_0.3": dict(lam=0.3),
    "weight_1": dict(lam=1.0),
    "weight_0": dict(lam=0.0),
    "neg_txt": dict(m_txt=9),
    "neg_img": dict(m_img=4),
    "neg_empty": dict(m_txt=0, m_img=0),
    "neg_smoothing": dict(m_txt=9, m_img=4, eps=0.2),
    "all": dict(n_groups=5, eps=0.1, lam=0.3, m_txt=7, m_img=3, bias=-3.0),
}


def _fused(case, dtype, backend, chunk_size=None):
    def leaf(t):
        return None if t is None else t.to(device=DEV, dtype=dtype).requires_grad_(True)

    x, t, nt, ni = leaf(case["img"]), leaf(case["txt"]), leaf(case["neg_txt"]), leaf(case["neg_img"])
    s = torch.tensor(case["scale"], dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                     device=DEV, requires_grad=True)
    ids = None if case["ids"] is None else case["ids"].to(DEV)
    kw = {"chunk_size": chunk_size} if chunk_size else {}
    loss = clip_fast.clip_loss(x, t, s, case["bias"], group_ids=ids, label_smoothing=case["eps"],
                               image_to_text_weight=case["lam"], negative_text_features=nt,
                               negative_image_features=ni, backend=backend, **kw)
    loss.backward()
    return (loss.detach(), x.grad, t.grad, s.grad,
            None if nt is None else nt.grad, None if ni is None else ni.grad)


def _reference(case):
    out = reference_family_loss(case["img"], case["txt"], case["scale"], case["bias"],
                                group_ids=case["ids"], label_smoothing=case["eps"],
                                image_to_text_weight=case["lam"], negative_text=case["neg_txt"],
                                negative_image=case["neg_img"])
    return out[:4] + out[5:]


def _rounded(case, dtype):
    """The case with its features rounded to ``dtype`` (what every loss in that dtype sees)."""
    out = dict(case)
    for k in ("img", "txt", "neg_txt", "neg_img"):
        if out[k] is not None:
            out[k] = out[k].to(dtype).double()
    return out


def _materialised(case, dtype):
    """PyTorch's materialised loss and gradients with everything in ``dtype``."""
    def leaf(t):
        return None if t is None else t.to(dtype).requires_grad_(True)

    x, t, nt, ni = leaf(case["img"]), leaf(case["txt"]), leaf(case["neg_txt"]), leaf(case["neg_img"])
    s = torch.tensor(case["scale"], dtype=dtype, requires_grad=True)
    n = x.shape[0]
    rows = x if ni is None else torch.cat([x, ni])
    cols = t if nt is None else torch.cat([t, nt])
    logits = s * rows @ cols.T
    if case["bias"] is not None:
        logits = logits + case["bias"]
    q_row = family_targets(n, cols.shape[0] - n, case["ids"], case["eps"]).to(dtype)
    q_col = family_targets(n, rows.shape[0] - n, case["ids"], case["eps"]).to(dtype)
    lam = case["lam"]
    loss = lam * F.cross_entropy(logits[:n], q_row) + (1 - lam) * F.cross_entropy(logits[:, :n].T, q_col)
    loss.backward()
    return (loss.detach(), x.grad, t.grad, s.grad,
            None if nt is None else nt.grad, None if ni is None else ni.grad)


def _error(got, ref):
    return (got.double().cpu() - ref).norm().item()


# ---- fp32 / float64 values ----

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("n,d", [(37, 13), (64, 32)])
def test_options_fp32(backend, option, n, d, kernel_blocks):
    """Each option (and all together) in fp32: loss and every gradient against float64."""
    _skip_unless(backend, torch.float32)
    case = _case(n, d, seed=n + d, **OPTIONS[option])
    got, ref = _fused(case, torch.float32, backend), _reference(case)
    for what, g, r in zip(NAMES, got, ref):
        if r is None:
            assert g is None, what
            continue
        assert g is not None and torch.isfinite(g).all(), f"{what}: missing or not finite"
        tol = 2e-5 * max(r.abs().max().item() if r.numel() else 0.0, 1e-3)
        assert _error(g, r) <= tol * max(1.0, r.numel() ** 0.5), f"{option} {what}: {_error(g, r):.3e}"


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("n,d", [(1, 1), (2, 5), (77, 33)])
def test_options_float64(option, n, d):
    """The torch backend in float64 matches the reference to float64 rounding."""
    case = _case(n, d, seed=3 * n + d, **OPTIONS[option])
    got, ref = _fused(case, torch.float64, "torch", chunk_size=16), _reference(case)
    for what, g, r in zip(NAMES, got, ref):
        if r is None:
            continue
        scale = max(r.abs().max().item() if r.numel() else 0.0, 1.0)
        assert _error(g, r) <= 1e-11 * scale * max(1.0, r.numel() ** 0.5), f"{option} {what}"


@pytest.mark.parametrize("backend", backend_params())
def test_distinct_ids_and_defaults_are_clip(backend, kernel_blocks):
    """All ids distinct, eps = 0, lam = 0.5 and no negatives is the plain CLIP loss."""
    _skip_unless(backend, torch.float32)
    case = _case(50, 24, seed=11)
    plain = _fused(case, torch.float32, backend)
    case_ids = dict(case, ids=torch.randperm(50) * 3 + 7)
    with_ids = _fused(case_ids, torch.float32, backend)
    for what, a, b in zip(NAMES[:4], plain, with_ids):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=2e-7, msg=what)


# ---- the precision rule, per dtype ----

def _precision_cases():
    return {
        # confident rows at scale 100: the pair's logit dominates each row and column
        "confident_groups": _case(97, 100, seed=21, noise=0.05, scale=100.0, n_groups=40),
        "confident_smoothing": _case(97, 100, seed=22, noise=0.05, scale=100.0, eps=0.1),
        "confident_all": _case(97, 100, seed=23, noise=0.05, scale=100.0, n_groups=40, eps=0.05,
                               lam=0.7, m_txt=11, m_img=5),
        # very large |S|: rows of norm 10 at scale 100
        "large_logits_groups": _case(65, 17, seed=24, noise=0.3, scale=100.0, n_groups=8, norm=10.0),
        "large_logits_negatives": _case(65, 17, seed=25, noise=0.3, scale=100.0, m_txt=13, m_img=6,
                                        norm=10.0),
        "duplicates_groups": _case(128, 8, seed=26, noise=1.0, scale=30.0, n_groups=3),
    }


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(_precision_cases()))
def test_precision_rule(backend, dtype, name, kernel_blocks):
    """Error against float64 <= FACTOR x the materialised loss's error in the same dtype."""
    _skip_unless(backend, dtype)
    case = _rounded(_precision_cases()[name], dtype)
    ref, mat = _reference(case), _materialised(case, dtype)
    got = _fused(case, dtype, backend)
    for what, g, m, r in zip(NAMES, got, mat, ref):
        if r is None or r.numel() == 0:
            continue
        g, m = g.double().cpu(), m.double()
        assert torch.isfinite(g).all(), f"{backend} {dtype} {what}: not finite"
        m_err = (m - r).norm().item() if torch.isfinite(m).all() else float("inf")
        allowed = FACTOR * max(m_err, UNIT[dtype] * r.norm().item())
        assert _error(g, r) <= allowed, (
            f"{backend} {dtype} {name} {what}: error {_error(g, r):.3e} > {FACTOR} x materialised "
            f"{m_err:.3e}")


# ---- API corners ----

def test_module_forwards_options():
    """FastClipLoss takes eps and lam in its constructor and the per-batch tensors in forward."""
    case = _case(20, 8, seed=31, n_groups=4, eps=0.1, lam=0.4, m_txt=3, m_img=2)
    mod = clip_fast.FastClipLoss(label_smoothing=0.1, image_to_text_weight=0.4, backend="torch")
    assert "label_smoothing=0.1" in repr(mod) and "image_to_text_weight=0.4" in repr(mod)
    got = mod(case["img"].float(), case["txt"].float(), case["scale"], group_ids=case["ids"],
              negative_text_features=case["neg_txt"].float(),
              negative_image_features=case["neg_img"].float(), output_dict=True)
    ref = _reference(case)[0]
    assert abs(float(got["contrastive_loss"]) - float(ref)) <= 1e-5 * float(ref)


def test_empty_negatives_get_zero_gradients():
    case = _case(12, 6, seed=32, m_txt=0, m_img=0)
    got = _fused(case, torch.float32, "torch")
    assert got[4].shape == (0, 6) and got[5].shape == (0, 6)


def test_weight_zero_negatives_get_zero_gradients():
    """lam = 1: the text->image softmax has weight 0, so negative images get exactly 0."""
    case = _case(12, 6, seed=33, m_img=3, lam=1.0)
    got = _fused(case, torch.float32, "torch")
    assert torch.equal(got[5], torch.zeros_like(got[5]))


def test_autocast_casts_negatives():
    case = _case(16, 8, seed=34, m_txt=4, m_img=2, n_groups=3)
    x, t = case["img"].float(), case["txt"].float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = clip_fast.clip_loss(x, t, 10.0, group_ids=case["ids"], backend="torch",
                                   negative_text_features=case["neg_txt"].float(),
                                   negative_image_features=case["neg_img"].float())
    assert loss.dtype == torch.float32
    ref = _reference(_rounded(case, torch.bfloat16) | {"scale": 10.0})[0]
    assert abs(float(loss) - float(ref)) <= 1e-4 * float(ref)


def test_compile_fullgraph_with_options():
    case = _case(24, 8, seed=35, n_groups=5, eps=0.1, lam=0.3, m_txt=3, m_img=2)
    clip_fast.clip.backends.preload("torch")

    def f(x, t, s, ids, nt, ni):
        return clip_fast.clip_loss(x, t, s, group_ids=ids, label_smoothing=0.1, image_to_text_weight=0.3,
                                   negative_text_features=nt, negative_image_features=ni, backend="torch")

    leaves = [case[k].float().requires_grad_(True) for k in ("img", "txt")]
    negs = [case[k].float().requires_grad_(True) for k in ("neg_txt", "neg_img")]
    s = torch.tensor(30.0, requires_grad=True)
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(leaves[0], leaves[1], s, case["ids"], *negs)
    loss.backward()
    ref = _reference(case)
    assert abs(float(loss.detach()) - float(ref[0])) <= 1e-5 * float(ref[0])
    for g, r in zip((leaves[0].grad, leaves[1].grad, s.grad, negs[0].grad, negs[1].grad),
                    (ref[1], ref[2], ref[3], ref[4], ref[5])):
        assert _error(g, r) <= 1e-5 * max(r.norm().item(), 1e-3)


BAD = [
    (dict(group_ids=torch.zeros(5, dtype=torch.int64)), ValueError, "group_ids must have shape"),
    (dict(group_ids=torch.zeros(8)), TypeError, "group_ids must be an integer tensor"),
    (dict(group_ids=[0] * 8), TypeError, "group_ids must be an"),
    (dict(label_smoothing=1.0), ValueError, "label_smoothing must be a float in"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be a float in"),
    (dict(image_to_text_weight=1.5), ValueError, "image_to_text_weight must be a float in"),
    (dict(image_to_text_weight=True), ValueError, "image_to_text_weight must be a float in"),
    (dict(negative_text_features=torch.zeros(3, 5)), ValueError, "negative_text_features must have shape"),
    (dict(negative_image_features=torch.zeros(3, 4, dtype=torch.float64)), TypeError,
     "negative_image_features must have the features' dtype"),
    (dict(negative_text_features=torch.zeros(4)), ValueError, "negative_text_features must have shape"),
    (dict(negative_image_features=torch.zeros(2, 4, device="meta")), ValueError,
     "negative_image_features is on meta"),
    (dict(group_ids=torch.zeros(8, dtype=torch.int64, device="meta")), ValueError, "group_ids is on meta"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_options_are_named(kwargs, exc, match):
    x, t = torch.randn(8, 4), torch.randn(8, 4)
    with pytest.raises(exc, match=match):
        clip_fast.clip_loss(x, t, 10.0, backend="torch", **kwargs)


def test_bad_module_options_are_named():
    with pytest.raises(ValueError, match="label_smoothing"):
        clip_fast.FastClipLoss(label_smoothing=2)
    with pytest.raises(ValueError, match="image_to_text_weight"):
        clip_fast.FastClipLoss(image_to_text_weight=-1)
