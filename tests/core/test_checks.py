"""The one conversion of ``logit_scale``/``logit_bias`` (``clip_fast.core.checks``): the
scalar every backend reads, made once at the entry, still differentiable back to the
caller's tensor in its own dtype and shape; then each loss against the float64 reference
with a scale of another dtype and shape than the features'."""
import pytest
import torch

import clip_fast
from clip_fast.core.checks import check_inputs
from helpers import features
from reference import reference_clip_loss, reference_siglip_loss


@pytest.mark.parametrize("feat_dtype,want", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_scalars_become_the_backends_0d_compute_dtype_scalar(feat_dtype, want):
    img = features(5, 3, feat_dtype)
    scale = torch.tensor([2.5], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.25, dtype=torch.float16, requires_grad=True)
    s, b = check_inputs(img, img, scale, bias)
    assert s.shape == () and b.shape == () and s.dtype == want and b.dtype == want
    assert s.item() == 2.5 and b.item() == -1.25
    (3.0 * s + 5.0 * b).backward()
    assert scale.grad.shape == (1,) and scale.grad.dtype == torch.float64 and scale.grad.item() == 3.0
    assert bias.grad.shape == () and bias.grad.dtype == torch.float16 and bias.grad.item() == 5.0
    s_num, b_num = check_inputs(img, img, 7.0, None)
    assert s_num.shape == () and s_num.dtype == want and b_num is None


def _grads(loss_fn, scale_shape, bias=None):
    img = features(7, 5).requires_grad_(True)
    txt = features(7, 5).requires_grad_(True)
    scale = torch.full(scale_shape, 10.0, dtype=torch.float64, requires_grad=True)
    args = (img, txt, scale) + ((bias,) if bias is not None else ())
    loss = loss_fn(*args)
    loss.backward()
    return img, txt, scale, loss


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_clip_loss_with_a_float64_scale_matches_the_reference(backend, scale_shape):
    img, txt, scale, loss = _grads(lambda i, t, s: clip_fast.clip_loss(i, t, s, backend=backend), scale_shape)
    ref = reference_clip_loss(img, txt, scale.detach())
    assert scale.grad.shape == scale_shape and scale.grad.dtype == torch.float64
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(img.grad.double(), ref[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scale.grad.reshape(()), ref[3], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_siglip_loss_with_float64_scale_and_bias_matches_the_reference(backend):
    bias = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    img, txt, scale, loss = _grads(
        lambda i, t, s, b: clip_fast.siglip_loss(i, t, s, b, backend=backend), (1,), bias)
    ref = reference_siglip_loss(img, txt, scale.detach(), bias.detach())
    assert bias.grad.shape == (1,) and bias.grad.dtype == torch.float64
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(txt.grad.double(), ref[2], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scale.grad.reshape(()), ref[3], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bias.grad.reshape(()), ref[4], rtol=1e-4, atol=1e-6)
