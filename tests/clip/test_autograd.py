"""Autograd's corners: what open_clip's materialised loss supports either works here, or
raises a clear error; never a silent first-order or wrong answer."""
import pytest
import torch

from reference import reference_clip_loss

import clip_fast


def _pair(n=9, d=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(11)
    return (torch.randn(n, d, dtype=dtype, generator=g), torch.randn(n, d, dtype=dtype, generator=g))


def test_double_backward_raises():
    """A gradient penalty through the loss's gradient raises instead of losing its terms."""
    img, txt = _pair()
    img.requires_grad_(True)
    (g,) = torch.autograd.grad(clip_fast.clip_loss(img, txt, 3.0), img, create_graph=True)
    ref = reference_clip_loss(img.detach(), txt, 3.0)[1]
    assert torch.allclose(g.detach(), ref, rtol=1e-10, atol=1e-12)  # first order still right
    with pytest.raises(RuntimeError, match="does not support double backward"):
        g.pow(2).sum().backward()


def test_func_grad_matches_reference():
    """torch.func.grad (one level) gives the float64 reference gradient."""
    img, txt = _pair()
    g = torch.func.grad(lambda a: clip_fast.clip_loss(a, txt, 3.0))(img)
    assert torch.allclose(g, reference_clip_loss(img, txt, 3.0)[1], rtol=1e-10, atol=1e-12)


def test_nested_func_grad_raises():
    """grad of grad would differentiate the fused backward: a clear error."""
    img, txt = _pair()
    inner = torch.func.grad(lambda a: clip_fast.clip_loss(a, txt, 3.0))
    with pytest.raises(RuntimeError, match="one torch.func.grad level"):
        torch.func.grad(lambda b: inner(b).sum())(img)


def test_vmap_raises():
    """A batch of losses under vmap is refused with a message saying what to do."""
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="vmap"):
        torch.func.vmap(lambda a: clip_fast.clip_loss(a, a, 3.0))(x)


def test_same_tensor_both_sides_compiles():
    """One tensor for both towers under torch.compile(fullgraph=True): both gradients arrive."""
    x = torch.randn(8, 4, dtype=torch.float64)
    a = x.clone().requires_grad_(True)
    mod = torch.compile(clip_fast.FastClipLoss(), fullgraph=True, backend="aot_eager")
    loss = mod(a, a, torch.tensor(2.0, dtype=torch.float64))
    loss.backward()
    ref = reference_clip_loss(x, x, 2.0)
    assert torch.allclose(loss.detach(), ref[0], rtol=1e-10)
    assert torch.allclose(a.grad, ref[1] + ref[2], rtol=1e-9, atol=1e-12)


def test_autocast_leaves_float64_alone():
    """autocast does not cast float64 matmul inputs; neither does the loss (open_clip returns fp64)."""
    img, txt = _pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = clip_fast.clip_loss(img, txt, 3.0)
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, reference_clip_loss(img, txt, 3.0)[0], rtol=1e-12)


def test_autocast_casts_float32():
    """float32 features under bf16 autocast run in bf16; the loss comes back in float32."""
    img, txt = _pair(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = clip_fast.clip_loss(img, txt, 3.0)
    ref = reference_clip_loss(img.bfloat16().double(), txt.bfloat16().double(), 3.0)[0]
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))


def test_meta_tensors_give_meta_scalar():
    """Meta features (shape propagation) give a meta scalar loss and meta gradients."""
    img = torch.empty(7, 3, device="meta", requires_grad=True)
    txt = torch.empty(7, 3, device="meta", requires_grad=True)
    loss = clip_fast.clip_loss(img, txt, torch.tensor(2.0, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert img.grad.shape == (7, 3) and txt.grad.device.type == "meta"


@pytest.mark.parametrize("which", ["image_features", "text_features"])
def test_sparse_features_error_names_argument(which):
    """A sparse tensor is refused by name, with its layout, shape and dtype."""
    img, txt = _pair()
    args = {"image_features": img, "text_features": txt}
    args[which] = args[which].to_sparse()
    with pytest.raises(TypeError, match=rf"{which} must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        clip_fast.clip_loss(args["image_features"], args["text_features"], 3.0)
