"""Exactness where CLIP trains: every backend against the float64 reference, judged by
flash-attention's and cut-cross-entropy's rule.

In each dtype, a backend's error against the float64 loss of the same (dtype-rounded)
inputs must be at most a small multiple of the error of PyTorch's own materialised loss
(logits, cross-entropy and autograd, all in that dtype).  Errors are norm-wise:
||got - ref|| for the loss and each gradient, with a floor of one unit of the dtype
times ||ref|| so that a materialised loss that happens to be exact does not demand
more than exactness.

Every backend that runs here is checked: torch, and triton (the Triton interpreter on
CPU; on a GPU machine the real kernels).  The cuda backend runs the same cases on a GPU
(marked ``gpu``, run by benchmarks/gpu_check.sh).

bf16 in the Triton interpreter: its bf16 tl.dot is broken, so the kernels upcast bf16
tiles to fp32 before the dot (exact for bf16 values); this covers the bf16 loads, the
fp32 epilogue and the bf16 workspace, not the bf16 MMA instruction (the gpu tests do).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from reference import reference_clip_loss, reference_family_loss, reference_siglip_loss  # noqa: E402

import clip_fast  # noqa: E402
from helpers import DTYPE_UNIT as UNIT, PRECISION_FACTOR as FACTOR, backend_params, seed_ratio  # noqa: E402
from clip_fast.clip import backends  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- the cases: float64 (img, txt, scale, bias), each from its own generator ----

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _correlated(n, d, noise, seed, norm=1.0):
    """Unit image rows and text rows near them: cos ~ 1 / sqrt(1 + noise^2 d / 100)."""
    g = _gen(seed)
    x = F.normalize(torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    t = F.normalize(x + noise / 10 * torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    return norm * x, norm * t


def confident_rows(noise=1.5, n=97, d=100):
    """Scale 100, unit features, the pair's cosine well above the rest: loss ~1e-6."""
    x, t = _correlated(n, d, noise, seed=1)
    return x, t, 100.0, None


def row_norm(norm, noise):
    """65 x 17 features whose rows all have the given norm, at scale 100 (|S| ~ 100 norm^2)."""
    x, t = _correlated(65, 17, noise, seed=2, norm=norm)
    return x, t, 100.0, None


def long_reduction(n=4099, d=2):
    """d_scale and the loss sum n^2 terms; D = 2 makes many near-tied logits."""
    g = _gen(3)
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    t = torch.randn(n, d, dtype=torch.float64, generator=g)
    return x, t, 1.0, None


def duplicated_batch(n=1024, d=8):
    """Every pair appears twice: ties on the top logit of every row and column."""
    x, t = _correlated(n // 2, d, 3.0, seed=4)
    return x.repeat_interleave(2, 0), t.repeat_interleave(2, 0), 30.0, None


def large_bias(bias=1e3):
    """A bias of 1e3 cancels from the loss exactly; it must not cost digits."""
    x, t = _correlated(77, 33, 2.0, seed=5)
    return x, t, 30.0, bias


def small_loss(n=1025):
    """A nearly solved batch: the loss (2.8e-7 here) is far smaller than the logits (~50)."""
    x, t = _correlated(n, 64, 1.0, seed=6)
    return x, t, 50.0, None


# ---- the Triton kernel variants (kernels/config.py VARIANTS): with CLIP_FAST_TEST_VARIANTS=all
#      every test below runs under each ----

@pytest.fixture(autouse=True, params=[
    "default",
    pytest.param("share_exp", marks=pytest.mark.slow),
    pytest.param("fused_bwd", marks=pytest.mark.slow),
    pytest.param("share_exp+fused_bwd", marks=pytest.mark.slow),
    pytest.param("tma", marks=pytest.mark.slow),
    pytest.param("tma_persistent", marks=pytest.mark.slow),
    pytest.param("regs128", marks=pytest.mark.slow)])
def kernel_variant(request):
    """Run the test under one Triton kernel variant; the variants are Triton designs, so a
    test of another backend (or of none) runs only once, as ``default``."""
    from clip_fast.kernels import config as kconfig

    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    if request.param != "default" and backend != "triton":
        pytest.skip("kernel variants apply to the triton backend only")
    if request.param != "default" and os.environ.get("CLIP_FAST_TEST_VARIANTS") != "all":
        # Every variant through every case here is ~4x this module's interpreter time, more
        # than CI's budget allows; CI runs tests/kernels/test_variants.py (each variant's
        # arithmetic, both sides of share_exp's condition) and compiles every variant.
        pytest.skip("the non-default variants run with CLIP_FAST_TEST_VARIANTS=all")
    with kconfig.variant_override(request.param):
        yield request.param


# ---- the check ----

def _materialised(x, t, scale, bias, dtype):
    """PyTorch's materialised loss and gradients with everything in ``dtype``."""
    xm = x.to(dtype).requires_grad_(True)
    tm = t.to(dtype).requires_grad_(True)
    sm = torch.tensor(scale, dtype=dtype, requires_grad=True)
    logits = sm * xm @ tm.T
    if bias is not None:
        logits = logits + bias
    labels = torch.arange(x.shape[0])
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    return loss.detach(), xm.grad, tm.grad, sm.grad


def _fused(x, t, scale, bias, dtype, backend):
    xf = x.to(device=DEV, dtype=dtype).requires_grad_(True)
    tf = t.to(device=DEV, dtype=dtype).requires_grad_(True)
    sf = torch.tensor(scale, dtype=dtype, device=DEV, requires_grad=True)
    loss = clip_fast.clip_loss(xf, tf, sf, bias, backend=backend)
    loss.backward()
    return loss.detach(), xf.grad, tf.grad, sf.grad


def _check(case, dtype, backend):
    reason = backends.unavailable_reason(backend, DEV, dtype)
    if reason is not None:
        pytest.skip(reason)
    x, t, scale, bias = case
    # The reference sees exactly the inputs both losses see: the dtype-rounded features.
    x, t = x.to(dtype).double(), t.to(dtype).double()
    ref = reference_clip_loss(x, t, scale, bias)[:4]
    mat = _materialised(x, t, scale, bias, dtype)
    got = _fused(x, t, scale, bias, dtype, backend)
    for what, g, m, r in zip(("loss", "d_img", "d_txt", "d_scale"), got, mat, ref):
        g, m = g.double().cpu(), m.double().cpu()
        assert torch.isfinite(g).all(), f"{backend} {dtype} {what}: not finite"
        err = (g - r).norm().item()
        allowed = FACTOR * max((m - r).norm().item() if torch.isfinite(m).all() else float("inf"),
                               UNIT[dtype] * r.norm().item()) + 1e-300
        assert err <= allowed, (f"{backend} {dtype} {what}: error {err:.3e} > {FACTOR} x materialised "
                                f"{allowed / FACTOR:.3e} (|ref| {r.norm().item():.3e})")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_confident_rows_at_scale_100(backend, dtype):
    """P_ii - 1 cancels on a confident row; the diagonal must come from the forward's terms."""
    _check(confident_rows(), dtype, backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("norm", [1.0, 10.0, 30.0, 100.0, 1000.0])
@pytest.mark.parametrize("noise", [0.5, 3.0], ids=["confident", "confused"])
def test_large_logits(backend, norm, noise):
    """|S| up to ~1e8: the backward's S must match the forward's so a dominant P is exactly 1."""
    _check(row_norm(norm, noise), torch.float32, backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_logits_half(backend, dtype):
    """Row norm 30 in fp16/bf16: the true gradient is ~0 and must stay ~0."""
    _check(row_norm(30.0, 0.5), dtype, backend)


@pytest.mark.parametrize("backend", backend_params())
def test_long_reduction(backend, kernel_blocks):
    """n^2 = 1.7e7 terms in d_scale and the loss: blocked or float64 sums, not one fp32 dot."""
    _check(long_reduction(), torch.float32, backend)


@pytest.mark.parametrize("backend", backend_params())
def test_duplicated_batch(backend, kernel_blocks):
    """Every row's top logit is tied with its duplicate's."""
    _check(duplicated_batch(), torch.float32, backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("bias", [-1e3, 1e3, 3e4])
def test_large_bias(backend, bias):
    """The bias cancels from every softmax; it never enters the arithmetic, its gradient is 0."""
    _check(large_bias(bias), torch.float32, backend)
    img, txt, scale, _ = large_bias(bias)
    b = torch.tensor(bias, dtype=torch.float32, device=DEV, requires_grad=True)
    loss = clip_fast.clip_loss(img.float().to(DEV), txt.float().to(DEV), scale, b, backend=backend)
    loss.backward()
    assert b.grad is not None and b.grad.item() == 0.0


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_small_loss(backend, dtype, kernel_blocks):
    """A loss of 1e-7 formed from per-pair terms, not as a difference of sums of size ~50 n."""
    _check(small_loss(), dtype, backend)


# ---- the loss options in fp32, judged over seeds ----

def _option_case(kind, n, d, seed):
    """(img, txt, negative texts, negative images), float64 values of fp32 numbers, with
    n // 3 + 1 negatives of each kind.  bigS: rows of norm 3.16 at scale 100 (|S| ~ 1e3),
    texts near their images; confident: unit rows, texts at noise 0.1 (scale 100)."""
    g = _gen(seed)
    m = n // 3 + 1
    draw = lambda k: torch.randn(k, d, dtype=torch.float64, generator=g)  # noqa: E731
    if kind == "bigS":
        x = 3.16 * F.normalize(draw(n), dim=1)
        t = 3.16 * F.normalize(x + 0.8 * draw(n), dim=1)
        nt, ni = 3.16 * F.normalize(draw(m), dim=1), 3.16 * F.normalize(draw(m), dim=1)
    else:
        x = F.normalize(draw(n), dim=1)
        t = F.normalize(x + 0.1 * draw(n), dim=1)
        nt, ni = F.normalize(draw(m), dim=1), F.normalize(draw(m), dim=1)
    return [v.float().double() for v in (x, t, nt, ni)]


def _family_run(x, t, nt, ni, opts, dtype, backend):
    """(loss, d_img, d_txt, d_scale, d_neg_txt, d_neg_img): the fused loss for a backend
    name, else (backend=None) the materialised soft-target loss in ``dtype``."""
    if not backend:
        out = reference_family_loss(x, t, 100.0, negative_text=nt, negative_image=ni, dtype=dtype, **opts)
        return [out[k].detach().double() for k in (0, 1, 2, 3, 5, 6)]
    leaves = [v.to(device=DEV, dtype=dtype).requires_grad_(True) for v in (x, t, nt, ni)]
    xf, tf, ntf, nif = leaves
    sf = torch.tensor(100.0, dtype=dtype, device=DEV, requires_grad=True)
    loss = clip_fast.clip_loss(xf, tf, sf, negative_text_features=ntf, negative_image_features=nif,
                               backend=backend, **opts)
    grads = torch.autograd.grad(loss, [xf, tf, sf, ntf, nif])
    return [loss.detach().double().cpu()] + [g.detach().double().cpu() for g in grads]


OPTION_CASES = {
    "negatives-bigS": ("bigS", {}),
    "negatives-confident": ("confident", {}),
    "weight-bigS": ("bigS", dict(image_to_text_weight=0.3)),
    "all-confident": ("confident", dict(image_to_text_weight=0.3, label_smoothing=0.1)),
}


def _option_params():
    return [pytest.param(name, b.values[0], marks=b.marks, id=f"{name}-{b.values[0]}")
            for name in OPTION_CASES for b in backend_params()]


@pytest.mark.parametrize("name,backend", _option_params())
def test_options_in_fp32_within_rule_over_seeds(name, backend):
    """Hard negatives and unequal direction weights in fp32 at |S| ~ 1e3 and on confident rows:
    within the rule over 8 seeds (``helpers.seed_ratio``)."""
    reason = backends.unavailable_reason(backend, DEV, torch.float32)
    if reason is not None:
        pytest.skip(reason)
    kind, opts = OPTION_CASES[name]
    n, d = (257, 65) if backend == "torch" else (97, 33)
    what = ("loss", "d_img", "d_txt", "d_scale", "d_neg_txt", "d_neg_img")
    pairs = [[] for _ in what]
    for seed in range(8):
        x, t, nt, ni = _option_case(kind, n, d, seed)
        ref = _family_run(x, t, nt, ni, opts, torch.float64, None)
        mat = _family_run(x, t, nt, ni, opts, torch.float32, None)
        got = _family_run(x, t, nt, ni, opts, torch.float32, backend)
        for k in range(len(what)):
            r = ref[k].double()
            pairs[k].append(((got[k].double().cpu() - r).norm().item(),
                             max((mat[k].double() - r).norm().item(), UNIT[torch.float32] * r.norm().item())))
    for k, ps in enumerate(pairs):
        ratio = seed_ratio(*zip(*ps))
        assert ratio <= FACTOR, (f"{backend} {name} {what[k]}: {ratio:.2f} x the materialised fp32 error over "
                                 f"8 seeds (worst seed {max(e / m for e, m in ps):.1f} x)")


# ---- logit_bias and Python-number scales ----

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("bias", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_bias_gives_non_finite_loss(backend, bias):
    """A bias that has gone bad cancels mathematically, but the loss must show it, as open_clip's does."""
    reason = backends.unavailable_reason(backend, DEV, torch.float32)
    if reason is not None:
        pytest.skip(reason)
    x, t, scale, _ = large_bias()
    b = torch.tensor(bias, device=DEV)
    xf, tf = x.float().to(DEV), t.float().to(DEV)
    assert not torch.isfinite(clip_fast.clip_loss(xf, tf, scale, b, backend=backend))
    assert not torch.isfinite(clip_fast.FastClipLoss(backend=backend)(xf, tf, scale, b))
    assert not torch.isfinite(clip_fast.siglip_loss(xf, tf, scale, b, backend=backend))


def test_python_number_scale_keeps_float64():
    """A float logit_scale and bias with float64 features are used in float64, not rounded to fp32."""
    x, t, _, _ = confident_rows()
    scale, bias = 100.0 / 3.0, 1.0 / 7.0  # neither is an fp32 number
    xs, ts = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss = clip_fast.clip_loss(xs, ts, scale, bias, backend="torch")
    loss.backward()
    ref = reference_clip_loss(x, t, scale, bias)
    torch.testing.assert_close(loss, ref[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(xs.grad, ref[1], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ts.grad, ref[2], rtol=1e-10, atol=1e-14)
    sig = clip_fast.siglip_loss(x, t, scale, bias, backend="torch")
    sig_ref = reference_siglip_loss(x, t, scale, bias)[0]
    torch.testing.assert_close(sig, sig_ref, rtol=1e-12, atol=0)
