"""FastCoCaLoss and FastDistillClipLoss against open_clip's CoCaLoss and DistillClipLoss.

Each twin runs on the same inputs as its open_clip original; the loss and every input's
gradient must agree: in float64 to 1e-10 (the same maths), in float32 within fp32
rounding of the terms that cancel (open_clip's own float32 result is held to the same
float64 truth, so the bound is fair to both).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

open_clip_loss = pytest.importorskip("open_clip.loss")

from clip_fast import FastCoCaLoss, FastDistillClipLoss  # noqa: E402
from clip_fast.distill import distill_loss  # noqa: E402

_TRITON = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or torch.cuda.is_available()
BACKENDS = ["torch"] + (["triton"] if _TRITON else [])


def _features(n, d, dtype, gen, mix=0.5):
    img = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64) + mix * img, dim=1)
    return img.to(dtype), txt.to(dtype)


def _leaves(*xs, grad=True):
    return [x.detach().clone().requires_grad_(grad) for x in xs]


def _run_distill(loss_fn, inputs, teacher_grad):
    img, txt, s, timg, ttxt, t = _leaves(*inputs[:3]) + _leaves(*inputs[3:], grad=teacher_grad)
    out = loss_fn(img, txt, s, timg, ttxt, t, output_dict=True)
    total = out["contrastive_loss"] + 0.75 * out["distill_loss"]
    leaves = [img, txt, s] + ([timg, ttxt, t] if teacher_grad else [])
    grads = torch.autograd.grad(total, leaves)
    return [out["contrastive_loss"].detach(), out["distill_loss"].detach()] + list(grads)


def _distill_inputs(n, d, dtype, scale, tscale, seed, teacher_dim=None):
    gen = torch.Generator().manual_seed(seed)
    img, txt = _features(n, d, dtype, gen)
    timg, ttxt = _features(n, teacher_dim or d, dtype, gen, mix=1.5)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    return img, txt, torch.tensor(scale, dtype=sdt), timg, ttxt, torch.tensor(tscale, dtype=sdt)


def _assert_twin(got, want, truth, names, tight):
    for g, w, tr, name in zip(got, want, truth, names):
        if tight:
            torch.testing.assert_close(g.double(), w.double(), rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
            continue
        # float32: no worse than a few times open_clip's own float32 error, plus fp32 rounding
        # of the output's size.
        mag = tr.abs().max().item()
        ours = (g.double() - tr).abs().max().item()
        theirs = (w.double() - tr).abs().max().item()
        assert ours <= 4 * theirs + 4e-6 * max(mag, 1e-3), \
            f"{name}: ours {ours:.3g}, open_clip {theirs:.3g}, |x| {mag:.3g}"


_DISTILL_NAMES = ["contrastive_loss", "distill_loss", "d_img", "d_txt", "d_scale", "d_timg", "d_ttxt", "d_tscale"]


def _check_distill(n, d, dtype, backend, teacher_grad=True, scale=10.0, tscale=20.0, chunk_size=None, seed=0,
                   teacher_dim=None):
    inputs = _distill_inputs(n, d, dtype, scale, tscale, seed, teacher_dim)
    ours = _run_distill(FastDistillClipLoss(backend=backend, chunk_size=chunk_size), inputs, teacher_grad)
    theirs = _run_distill(open_clip_loss.DistillClipLoss(), inputs, teacher_grad)
    truth = _run_distill(open_clip_loss.DistillClipLoss(), [x.double() for x in inputs], teacher_grad)
    _assert_twin(ours, theirs, truth, _DISTILL_NAMES, tight=dtype == torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,dtype", [(7, 5, torch.float64), (33, 17, torch.float32), (1, 3, torch.float32),
                                       (40, 9, torch.float64)])
def test_distill_matches_open_clip(backend, n, d, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float16, bfloat16 and float32")
    _check_distill(n, d, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_frozen_teacher(backend):
    """The trainer's case: a teacher run under no_grad gets no gradients, the student all of them."""
    _check_distill(21, 13, torch.float32, backend, teacher_grad=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_wider_teacher(backend):
    """A teacher with its own embedding width (D = 40 against the student's 6), as distilling
    from a larger model gives."""
    _check_distill(13, 6, torch.float32, backend, teacher_dim=40)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (CUDA or TRITON_INTERPRET=1)")
def test_distill_triton_bfloat16_close_to_torch():
    """bfloat16 features: the Triton sweeps equal the torch backend's (both accumulate in fp32)."""
    inputs = _distill_inputs(37, 20, torch.bfloat16, 10.0, 20.0, 8)
    got = _run_distill(FastDistillClipLoss(backend="triton"), inputs, True)
    want = _run_distill(FastDistillClipLoss(backend="torch"), inputs, True)
    for g, w, name in zip(got, want, _DISTILL_NAMES):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (CUDA or TRITON_INTERPRET=1)")
def test_distill_triton_workspace_blocks(monkeypatch):
    """A workspace budget of a few tiles: the backward runs as several row and column blocks."""
    monkeypatch.setenv("CLIP_FAST_WORKSPACE_MB", "0.02")
    _check_distill(75, 9, torch.float32, "triton", teacher_dim=5)


def test_distill_chunked_strips():
    """Strips of 4 rows (several strips, a ragged last one) give the one-strip result."""
    _check_distill(37, 6, torch.float64, "torch", chunk_size=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_scale_100(backend):
    """Confident rows at scale 100: every KL summand is kept >= 0, none cancels against |S|."""
    _check_distill(19, 8, torch.float32, backend, scale=100.0, tscale=100.0)


def test_distill_under_autocast():
    """CPU autocast (bfloat16): the loss is float32 and close to open_clip's under the same autocast."""
    inputs = _distill_inputs(17, 12, torch.float32, 10.0, 20.0, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = FastDistillClipLoss(backend="torch")(*inputs)
        theirs = open_clip_loss.DistillClipLoss()(*inputs)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b.float(), rtol=2e-2, atol=2e-2)


def test_distill_backward_inside_autocast():
    """backward() inside the autocast region: the sweeps' float32 matmuls stay float32."""
    img, txt, s, timg, ttxt, t = _leaves(*_distill_inputs(11, 6, torch.float32, 10.0, 20.0, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        contrastive, distill = FastDistillClipLoss(backend="torch")(img, txt, s, timg, ttxt, t)
        (contrastive + distill).backward()
    for x in (img, txt, s, timg, ttxt, t):
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_distill_compiled_gradients_equal_eager():
    """torch.compile (aot_eager) of the module: the same loss and gradients as eager."""
    inputs = _distill_inputs(9, 5, torch.float32, 10.0, 20.0, 11)
    module = FastDistillClipLoss(backend="torch")
    eager = _run_distill(module, inputs, True)
    compiled = _run_distill(torch.compile(module, backend="aot_eager"), inputs, True)
    for a, b, name in zip(compiled, eager, _DISTILL_NAMES):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_distill_functional_equals_module():
    inputs = _distill_inputs(9, 4, torch.float64, 5.0, 7.0, 3)
    got = distill_loss(*inputs, backend="torch")
    want = FastDistillClipLoss(backend="torch")(*inputs)[1]
    assert torch.equal(got, want)


def test_distill_cuda_backend_refused():
    with pytest.raises(RuntimeError, match="backend='triton'.*backend='torch'"):
        FastDistillClipLoss(backend="cuda")


def test_distill_tuple_output():
    inputs = _distill_inputs(6, 4, torch.float64, 5.0, 7.0, 4)
    out = FastDistillClipLoss(backend="torch")(*inputs)
    ref = open_clip_loss.DistillClipLoss()(*inputs)
    assert isinstance(out, tuple) and len(out) == 2
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------
# CoCa
# ----------------------------------------------------------------------------------------

def _coca_inputs(n, d, length, vocab, dtype, seed, pad_id):
    gen = torch.Generator().manual_seed(seed)
    img, txt = _features(n, d, dtype, gen)
    logits = torch.randn(n, length, vocab, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, vocab, (n, length), generator=gen)
    labels[:, length // 2:] = pad_id  # padded tails, ignored by the caption loss
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    return img, txt, logits, labels, torch.tensor(14.0, dtype=sdt)


def _run_coca(loss_fn, inputs):
    img, txt, logits, scale = _leaves(inputs[0], inputs[1], inputs[2], inputs[4])
    out = loss_fn(img, txt, logits, inputs[3], scale, output_dict=True)
    assert set(out) == {"contrastive_loss", "caption_loss"}
    total = out["contrastive_loss"] + out["caption_loss"]
    grads = torch.autograd.grad(total, [img, txt, logits, scale], allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, [img, txt, logits, scale])]
    return [out["contrastive_loss"].detach().double(), out["caption_loss"].detach()] + grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip_w,cap_w,pad_id,dtype", [(1.0, 2.0, 0, torch.float64), (0.5, 1.0, 3, torch.float32),
                                                       (0.0, 2.0, 0, torch.float32)])
def test_coca_matches_open_clip(backend, clip_w, cap_w, pad_id, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float16, bfloat16 and float32")
    inputs = _coca_inputs(11, 7, 9, 13, dtype, 5, pad_id)
    ours = _run_coca(FastCoCaLoss(cap_w, clip_w, pad_id=pad_id, backend=backend), inputs)
    theirs = _run_coca(open_clip_loss.CoCaLoss(cap_w, clip_w, pad_id=pad_id), inputs)
    truth = _run_coca(open_clip_loss.CoCaLoss(cap_w, clip_w, pad_id=pad_id),
                      [x.double() if x.is_floating_point() else x for x in inputs])
    names = ["contrastive_loss", "caption_loss", "d_img", "d_txt", "d_logits", "d_scale"]
    _assert_twin(ours, theirs, truth, names, tight=dtype == torch.float64)


def test_coca_tuple_and_zero_clip_weight():
    """clip_loss_weight 0: open_clip's integer zero on the logits' device, and no sweep."""
    inputs = _coca_inputs(4, 3, 5, 6, torch.float32, 6, 0)
    ours = FastCoCaLoss(1.0, 0.0)(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4])
    theirs = open_clip_loss.CoCaLoss(1.0, 0.0)(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4])
    assert isinstance(ours, tuple) and ours[0].dtype == theirs[0].dtype and ours[0].item() == 0
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0)


def test_coca_horovod_refused():
    with pytest.raises(NotImplementedError, match="use_horovod"):
        FastCoCaLoss(1.0, 1.0, use_horovod=True)


@pytest.mark.slow
def test_distill_kernels_compile_for_sm90_without_gpu():
    """Compiled mode (not the interpreter): every distillation kernel variant compiles for
    sm_90 at the tile the launcher uses, without spills (``python -m clip_fast.kernels.aot_check``)."""
    import re

    from helpers import aot_check_report

    pytest.importorskip("triton")
    rc, report = aot_check_report("--arch", "90", "--dtype", "bf16", "--only", "distill:")
    if "ptxas not found" in report:
        pytest.skip("Triton's bundled ptxas is missing")
    assert rc == 0, report
    assert "aot_check: 0 failure(s)" in report, report
    spills = [int(x) for x in re.findall(r"spill_stores=(\d+)B", report)]
    assert len(spills) == 5 and max(spills) == 0, report
