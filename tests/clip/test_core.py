"""The public API and the torch backend against the float64 materialised reference."""
import math

import pytest
import torch
import torch.nn.functional as F

import clip_fast
from clip_fast import FastClipLoss, clip_loss
from clip_fast.clip.backends import torch_backend
from helpers import paired_features
from reference import (reference_block, reference_block_grads, reference_block_scale_split, reference_clip_loss,
                       reference_magnitudes)


def _assert_close(got, ref, rtol, atol_frac, what, magnitude=None):
    """|got - ref| <= atol_frac * magnitude + rtol * |ref|, elementwise.

    ``magnitude`` is the size of the terms that cancel (reference_magnitudes); by default max|ref|.
    """
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if magnitude is None:
        magnitude = ref.abs().max().item()
    atol = atol_frac * max(magnitude, 1e-30)
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_once(n, d, scale, bias, dtype=torch.float32, rtol=1e-4, atol_frac=1e-4, normalise=True,
                backend="torch", chunk_size=None):
    img, txt = paired_features(n, n, d, dtype, normalise)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    s = torch.tensor(scale, dtype=torch.float32, requires_grad=True)
    b = None if bias is None else torch.tensor(bias, dtype=torch.float32, requires_grad=True)
    loss = clip_loss(img, txt, s, b, backend=backend, chunk_size=chunk_size)
    loss.backward()
    ref_loss, ref_img, ref_txt, ref_s, ref_b = reference_clip_loss(img, txt, scale, bias)
    mag = reference_magnitudes(img, txt, scale, bias)
    assert loss.dtype == dtype and img.grad.dtype == dtype and txt.grad.dtype == dtype
    _assert_close(loss, ref_loss, rtol, atol_frac, "loss", mag[0])
    _assert_close(img.grad, ref_img, rtol, atol_frac, "d_image_features", mag[1])
    _assert_close(txt.grad, ref_txt, rtol, atol_frac, "d_text_features", mag[2])
    _assert_close(s.grad, ref_s, rtol, atol_frac, "d_logit_scale", mag[3])
    if b is not None:
        assert b.grad is not None and b.grad.item() == 0.0
        assert abs(ref_b.item()) < 1e-10


@pytest.mark.parametrize("n", [1, 2, 77, 1025])
@pytest.mark.parametrize("d", [1, 33, 129, 512])
def test_shapes_fp32(n, d):
    _check_once(n, d, 14.3, None)


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
@pytest.mark.parametrize("bias", [None, -10.0, 3.5])
@pytest.mark.parametrize("n,d", [(77, 33), (256, 129)])
def test_scale_and_bias(n, d, scale, bias):
    _check_once(n, d, scale, bias)


@pytest.mark.parametrize("n,d", [(1, 1), (2, 33), (77, 129), (300, 64)])
def test_unnormalised_features(n, d):
    """Raw (not L2-normalised) features of norm ~sqrt(D) give large logits."""
    _check_once(n, d, 1.0 / math.sqrt(d), 0.25, normalise=False)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 5000])
def test_chunking_is_exact(chunk_size):
    """Every strip height gives the float64 answer to float64 rounding."""
    _check_once(150, 33, 30.0, 1.0, dtype=torch.float64, rtol=1e-10, atol_frac=1e-10, chunk_size=chunk_size)


# dtype, rtol, atol given together: the torch backend accumulates in float32, so the only
# low-precision error is the final rounding of the loss and gradients to the input dtype.
@pytest.mark.parametrize("dtype,rtol,atol_frac", [
    (torch.float64, 1e-10, 1e-10),
    (torch.float32, 1e-4, 1e-4),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 1.6e-2, 1.6e-2),
])
def test_dtypes(dtype, rtol, atol_frac):
    _check_once(77, 129, 50.0, None, dtype=dtype, rtol=rtol, atol_frac=atol_frac)


def test_low_precision_no_worse_than_materialised_torch():
    """In bf16 the loss is at least as close to float64 as the materialised bf16 loss."""
    img, txt = paired_features(512, 512, 64, torch.bfloat16)
    ref = reference_clip_loss(img, txt, 100.0)[0].item()
    ours = clip_loss(img, txt, 100.0).double().item()
    logits = 100.0 * img @ txt.T
    labels = torch.arange(512)
    mat = ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).double().item()
    assert abs(ours - ref) <= max(abs(mat - ref), 2 ** -8 * abs(ref))


def test_gradcheck_float64():
    """torch.autograd.gradcheck over all four inputs (the bias derivative is 0)."""
    img, txt = paired_features(5, 5, 3, torch.float64, normalise=False)
    s = torch.tensor(2.5, dtype=torch.float64)
    b = torch.tensor(-0.7, dtype=torch.float64)
    args = [t.clone().requires_grad_(True) for t in (img, txt, s, b)]
    assert torch.autograd.gradcheck(lambda *a: clip_loss(*a, backend="torch", chunk_size=2), args)


def test_non_contiguous_inputs():
    img, txt = paired_features(2 * 77, 2 * 77, 3 * 33)
    img_v = img[::2, ::3].detach().requires_grad_(True)  # strided view
    txt_t = txt[::2, ::3].T.contiguous().T.detach().requires_grad_(True)  # column-major
    assert not img_v.is_contiguous() and not txt_t.is_contiguous()
    loss = clip_loss(img_v, txt_t, 20.0)
    loss.backward()
    ref = reference_clip_loss(img_v, txt_t, 20.0)
    _assert_close(loss, ref[0], 1e-4, 1e-4, "loss")
    _assert_close(img_v.grad, ref[1], 1e-4, 1e-4, "d_img")
    _assert_close(txt_t.grad, ref[2], 1e-4, 1e-4, "d_txt")


def test_autocast_cpu():
    """Under autocast the features are used in the autocast dtype; the loss is float32."""
    img, txt = paired_features(77, 77, 33)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = clip_loss(img, txt, 14.3)
    assert loss.dtype == torch.float32
    loss.backward()
    assert img.grad.dtype == torch.float32
    ref = reference_clip_loss(img.bfloat16(), txt.bfloat16(), 14.3)
    _assert_close(loss, ref[0], 1e-4, 1e-4, "loss")
    _assert_close(img.grad, ref[1], 1.6e-2, 1.6e-2, "d_img")


def test_autocast_backward_inside_the_region():
    """A backward run inside the autocast region gives the gradients of one run outside it."""
    img, txt = paired_features(77, 77, 33)
    grads = []
    for inside in (False, True):
        a, b = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        s = torch.tensor(14.3, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = clip_loss(a, b, s)
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append((a.grad, b.grad, s.grad))
    for what, got, want in zip(("d_img", "d_txt", "d_scale"), grads[1], grads[0]):
        assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("form", ["float", "int", "0d", "1elem", "param_fp64"])
def test_logit_scale_forms(form):
    img, txt = paired_features(33, 33, 17)
    value = {"float": 12.0, "int": 12, "0d": torch.tensor(12.0), "1elem": torch.tensor([12.0]),
             "param_fp64": torch.nn.Parameter(torch.tensor([12.0], dtype=torch.float64))}[form]
    if isinstance(value, torch.Tensor):
        value.requires_grad_(True)
    loss = clip_loss(img, txt, value)
    ref = reference_clip_loss(img, txt, 12.0)
    _assert_close(loss, ref[0], 1e-5, 1e-5, "loss")
    if isinstance(value, torch.Tensor):
        loss.backward()
        assert value.grad.shape == value.shape and value.grad.dtype == value.dtype
        _assert_close(value.grad.reshape(()), ref[3], 1e-4, 1e-4, "d_logit_scale")


# --- numerically hard cases -------------------------------------------------------------

def test_near_one_hot_rows_scale_100():
    """Scale 100 with nearly orthogonal pairs: softmaxes are ~one-hot, G cancels to ~0."""
    d = 256
    img = torch.eye(d)[:200] + 1e-3 * torch.randn(200, d)
    txt = img + 1e-3 * torch.randn(200, d)
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    _check_once_tensors(img, txt, 100.0, rtol=1e-3, atol_frac=1e-3)


def test_identical_embeddings():
    """Every row identical: all logits equal, the loss is exactly log N."""
    n = 77
    img = F.normalize(torch.randn(1, 33), dim=-1).expand(n, 33).contiguous()
    txt = img.clone()
    loss = clip_loss(img, txt, 100.0)
    assert math.isclose(loss.item(), math.log(n), rel_tol=1e-6)
    _check_once_tensors(img, txt, 100.0, rtol=1e-4, atol_frac=1e-4)


def test_zero_vectors():
    """Zero features: every logit is 0 (or the bias), the loss is log N, gradients finite."""
    n = 1025
    img = torch.zeros(n, 8, requires_grad=True)
    txt = torch.zeros(n, 8, requires_grad=True)
    loss = clip_loss(img, txt, 100.0, 5.0)
    loss.backward()
    assert math.isclose(loss.item(), math.log(n), rel_tol=1e-6)
    assert torch.isfinite(img.grad).all() and img.grad.abs().max().item() == 0.0


def test_large_logits_do_not_overflow():
    """Unnormalised features give logits of ~1e4: the log-sum-exps must stay finite."""
    img, txt = paired_features(64, 64, 32, normalise=False)
    _check_once_tensors(img * 10, txt * 10, 20.0, rtol=1e-4, atol_frac=1e-4)


def _check_once_tensors(img, txt, scale, rtol, atol_frac):
    img = img.detach().clone().requires_grad_(True)
    txt = txt.detach().clone().requires_grad_(True)
    loss = clip_loss(img, txt, scale)
    loss.backward()
    ref = reference_clip_loss(img, txt, scale)
    mag = reference_magnitudes(img, txt, scale)
    assert torch.isfinite(loss)
    _assert_close(loss, ref[0], rtol, atol_frac, "loss", mag[0])
    _assert_close(img.grad, ref[1], rtol, atol_frac, "d_img", mag[1])
    _assert_close(txt.grad, ref[2], rtol, atol_frac, "d_txt", mag[2])


# --- the backend contract on rectangular blocks -----------------------------------------

@pytest.mark.parametrize("m,k", [(1, 5), (5, 1), (77, 130), (130, 77)])
def test_torch_backend_rectangular_block(m, k):
    img, txt = torch.randn(m, 33, dtype=torch.float64), torch.randn(k, 33, dtype=torch.float64)
    s, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    lse_row, lse_col, diag = torch_backend.lse_forward(img, txt, s, b, chunk_size=16)
    ref_row, ref_col, ref_diag = reference_block(img, txt, 3.0, 0.5)
    for got, ref in ((lse_row, ref_row), (lse_col, ref_col), (diag, ref_diag)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    got = torch_backend.grad_backward(img, txt, s, b, lse_row, lse_col, 0.3, 0.2, 0.4, chunk_size=16)
    ref = reference_block_grads(img, txt, 3.0, 0.5, 0.3, 0.2, 0.4)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("m,k,with_diag,coef_row", [(7, 5, False, 0.3), (5, 9, True, 0.3), (6, 6, False, 0.0)])
def test_torch_backend_split_scale(m, k, with_diag, coef_row):
    """split_scale: d_scale as [row term off a diag-given diagonal, the rest]; the rest unchanged."""
    img, txt = torch.randn(m, 17, dtype=torch.float64), torch.randn(k, 17, dtype=torch.float64)
    s = torch.tensor(2.5, dtype=torch.float64)
    lse_row, lse_col, diag = torch_backend.lse_forward(img, txt, s, None, chunk_size=3)
    kw = dict(diag=diag) if with_diag else {}
    whole = torch_backend.grad_backward(img, txt, s, None, lse_row, lse_col, coef_row, 0.2, 0.4,
                                        chunk_size=3, **kw)
    split = torch_backend.grad_backward(img, txt, s, None, lse_row, lse_col, coef_row, 0.2, 0.4,
                                        chunk_size=3, split_scale=True, **kw)
    assert split[2].shape == (2,)
    torch.testing.assert_close(split[0], whole[0], rtol=0, atol=0)
    torch.testing.assert_close(split[1], whole[1], rtol=0, atol=0)
    torch.testing.assert_close(split[2].sum(), whole[2], rtol=1e-12, atol=1e-14)
    want = reference_block_scale_split(img, txt, 2.5, None, coef_row, 0.2, 0.4, with_diag)
    torch.testing.assert_close(split[2], want, rtol=1e-10, atol=1e-12)


# --- the module -------------------------------------------------------------------------

def test_module_matches_functional_and_output_dict():
    img, txt = paired_features(77, 77, 33)
    mod = FastClipLoss()
    out = mod(img, txt, torch.tensor(10.0), output_dict=True)
    assert set(out) == {"contrastive_loss"}
    assert torch.equal(out["contrastive_loss"], clip_loss(img, txt, 10.0))


def test_matches_open_clip_cliploss():
    """Same call, same value and gradients as open_clip's ClipLoss."""
    open_clip_loss = pytest.importorskip("open_clip.loss")
    img, txt = paired_features(129, 129, 64)
    scale = torch.tensor(14.3, requires_grad=True)
    ours_in = [t.clone().requires_grad_(True) for t in (img, txt)]
    theirs_in = [t.clone().requires_grad_(True) for t in (img, txt)]
    scale2 = scale.detach().clone().requires_grad_(True)
    ours = FastClipLoss()(*ours_in, scale)
    theirs = open_clip_loss.ClipLoss()(*theirs_in, scale2)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, b in ((ours_in[0].grad, theirs_in[0].grad), (ours_in[1].grad, theirs_in[1].grad),
                 (scale.grad, scale2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_torch_compile_module_fullgraph():
    """torch.compile sees through the Function: no graph break, same value and gradients."""
    img, txt = paired_features(40, 40, 16)
    mod = torch.compile(FastClipLoss(backend="torch"), backend="aot_eager", fullgraph=True)
    a = img.clone().requires_grad_(True)
    loss = mod(a, txt, torch.tensor(9.0))
    loss.backward()
    ref = reference_clip_loss(img, txt, 9.0)
    _assert_close(loss, ref[0], 1e-5, 1e-5, "loss")
    _assert_close(a.grad, ref[1], 1e-4, 1e-4, "d_img")


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("dtype,autocast", [
    pytest.param(torch.float32, False, id="fp32"), pytest.param(torch.float64, False, id="fp64"),
    pytest.param(torch.bfloat16, False, id="bf16"), pytest.param(torch.float16, False, id="fp16"),
    pytest.param(torch.float32, True, id="autocast-bf16")])
def test_torch_compile_gradients_equal_eager(compile_backend, dtype, autocast):
    """Compiled and eager agree on the loss and every gradient, in each dtype and under autocast.

    A loss already in the output dtype is where torch 2.11's compile gave all-zero gradients
    (see clip_fast/autograd.py, fresh_output): fp32, fp64 and autocast (an fp32 loss).  Under autocast
    the compiled backward also runs inside the autocast region (see ``autocast_off``).
    """
    torch._dynamo.reset()  # a fresh cache: no case may fall back to eager past the recompile limit
    img, txt = paired_features(24, 24, 16, dtype)

    def run(fn):
        leaves = [img.clone().requires_grad_(True), txt.clone().requires_grad_(True),
                  torch.tensor(9.0, requires_grad=True), torch.tensor(-0.5, requires_grad=True)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(*leaves)
        return [loss] + list(torch.autograd.grad(loss, leaves))

    eager = run(FastClipLoss(backend="torch"))
    compiled = run(torch.compile(FastClipLoss(backend="torch"), backend=compile_backend, fullgraph=True))
    for what, got, want in zip(("loss", "d_img", "d_txt", "d_scale", "d_bias"), compiled, eager):
        assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
        torch.testing.assert_close(got, want, msg=lambda m: f"{what}: {m}")
    assert all(g.abs().max() > 0 for g in eager[1:4]), "the eager gradients must not be zero themselves"


def test_available_backends_reports_reasons():
    report = clip_fast.available_backends("cpu")
    assert set(report) == {"torch", "triton", "cuda"}
    assert report["torch"] is None
    assert report["cuda"] is not None and isinstance(report["cuda"], str)


def test_named_unavailable_backend_raises():
    img, txt = paired_features(4, 4, 4)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        clip_loss(img, txt, 1.0, backend="cuda")


def test_env_var_picks_backend(monkeypatch):
    img, txt = paired_features(4, 4, 4)
    monkeypatch.setenv("CLIP_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        clip_loss(img, txt, 1.0)


# --- bad input ----------------------------------------------------------------------------

def _ok():
    return torch.randn(4, 8), torch.randn(4, 8)


@pytest.mark.parametrize("make,exc,pattern", [
    (lambda: (torch.randn(4, 8), torch.randn(5, 8), 1.0), ValueError, r"same batch size N.*\(4, 8\).*\(5, 8\)"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 9), 1.0), ValueError, r"same embedding dimension D.*\(4, 9\)"),
    (lambda: (torch.randn(4, 8, 1), torch.randn(4, 8), 1.0), ValueError, r"image_features must be 2-D.*3-D"),
    (lambda: (torch.randn(4, 8), torch.randn(8), 1.0), ValueError, r"text_features must be 2-D.*1-D"),
    (lambda: (torch.randn(0, 8), torch.randn(0, 8), 1.0), ValueError, r"empty batch.*N = 0"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 8).double(), 1.0), TypeError,
     r"image_features has dtype torch.float32 but text_features has dtype torch.float64.*cast"),
    (lambda: (torch.randint(0, 5, (4, 8)), torch.randn(4, 8), 1.0), TypeError,
     r"image_features must be a floating tensor.*torch.int64"),
    (lambda: (torch.randn(4, 8), torch.ones(4, 8, dtype=torch.bool), 1.0), TypeError,
     r"text_features must be a floating tensor.*torch.bool"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 8), torch.ones(2)), ValueError,
     r"logit_scale must hold exactly one element.*shape \(2,\)"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 8), torch.tensor(3)), TypeError,
     r"logit_scale must be a floating tensor.*torch.int64"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 8), "10"), TypeError, r"logit_scale must be a float.*str"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 8), True), TypeError, r"logit_scale must be a float.*bool"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 8), None), TypeError, r"logit_scale is required"),
    (lambda: ([[1.0]], torch.randn(1, 1), 1.0), TypeError, r"image_features must be a torch.Tensor.*list"),
])
def test_bad_input(make, exc, pattern):
    img, txt, scale = make()
    with pytest.raises(exc, match=pattern):
        clip_loss(img, txt, scale)
    with pytest.raises(exc, match=pattern):
        FastClipLoss()(img, txt, scale)


def test_bad_logit_bias():
    img, txt = _ok()
    with pytest.raises(ValueError, match=r"logit_bias must hold exactly one element.*shape \(4,\)"):
        clip_loss(img, txt, 1.0, torch.zeros(4))


def test_mixed_devices():
    """A tensor on the meta device stands in for a second device on a CPU-only machine."""
    img, txt = _ok()
    with pytest.raises(ValueError, match=r"image_features is on cpu but text_features is on meta"):
        clip_loss(img, txt.to("meta"), 1.0)
    with pytest.raises(ValueError, match=r"logit_scale is on meta but the features are on cpu"):
        clip_loss(img, txt, torch.tensor(1.0, device="meta"))


@pytest.mark.parametrize("kwargs,exc,pattern", [
    ({"use_horovod": True}, NotImplementedError, "use_horovod"),
    ({"backend": "tpu"}, ValueError, "backend must be one of"),
    ({"distributed": "tree"}, ValueError, "distributed must be one of"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
    ({"rank": 2, "world_size": 2}, ValueError, r"rank must be an int in \[0, world_size=2\)"),
    ({"world_size": 0}, ValueError, "world_size must be an int >= 1"),
    ({"distributed": "ring"}, ValueError, r"distributed mode='ring' computes the local_loss=True"),
])
def test_bad_module_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        FastClipLoss(**kwargs)


def test_distributed_clip_loss_takes_distributed_mode_is_an_alias():
    """``distributed_clip_loss(distributed=...)``, the name ``FastClipLoss`` takes; ``mode=``
    is accepted, and both given with different values raise before any collective."""
    from clip_fast.distributed import distributed_clip_loss

    img, txt = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="distributed='ring' and mode='gather'"):
        distributed_clip_loss(img, txt, 1.0, rank=0, world_size=2, distributed="ring", mode="gather")
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialised"):
        distributed_clip_loss(img, txt, 1.0, rank=0, world_size=2, mode="ring")


@pytest.mark.parametrize("module", ["FastClipLoss", "FastSigLipLoss", "FastDistillClipLoss"])
@pytest.mark.parametrize("kwargs,pattern", [
    ({"world_size": True}, "world_size must be an int >= 1, got True"),
    ({"world_size": 2.0}, "world_size must be an int >= 1"),
    ({"world_size": 2, "rank": True}, r"rank must be an int in \[0, world_size=2\), got True"),
    ({"world_size": 2, "rank": -1}, r"rank must be an int in \[0, world_size=2\)"),
])
def test_world_size_checked_alike(module, kwargs, pattern):
    """Every loss module checks ``world_size`` and ``rank`` by the one core rule (a bool is
    not a world size)."""
    import clip_fast

    with pytest.raises(ValueError, match=pattern):
        getattr(clip_fast, module)(**kwargs)
