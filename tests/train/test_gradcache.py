"""Gradient caching gives the full-batch step's parameter gradients (float64).

Without dropout the reference is one plain full-batch step.  With dropout the
reference is one autograd graph over the whole batch whose forward runs the same
micro-batches in the same order from the same seed, so both draw the same masks;
gradient caching only matches it if each re-run replays its micro-batch's RNG state
(the negative control removes the replay and expects a mismatch).
"""
import contextlib

import pytest
import torch

from clip_fast import FastClipLoss, clip_loss
from clip_fast import gradcache
from clip_fast.gradcache import grad_cache_step, plain_step
from clip_fast.train.models import CLIP, ModelConfig

# float64 end to end: the only differences are summation order, so the tolerance is tight.
RTOL, ATOL = 1e-9, 1e-12


def _tiny(image_encoder: str, dropout: float) -> CLIP:
    cfg = ModelConfig(image_encoder=image_encoder, image_size=8, in_channels=1, embed_dim=6,
                      cnn_widths=(4, 8), vit_patch=4, vit_width=8, vit_layers=1, vit_heads=2,
                      text_width=8, text_layers=1, text_heads=2, context_length=8,
                      n_buckets=64, dropout=dropout)
    return CLIP(cfg).double().train()


def _batch(n: int):
    images = torch.randn(n, 1, 8, 8, dtype=torch.float64)
    captions = [f"a photo of item {i % 4} number {i}" for i in range(n)]
    return images, captions


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _one_graph_step(model, images, tokens, loss_fn, micro):
    """Full-batch loss and backward through one graph; forward in micro-batch order."""
    parts = [model(im, tk) for im, tk in zip(images.split(micro), tokens.split(micro))]
    img = torch.cat([p[0] for p in parts])
    txt = torch.cat([p[1] for p in parts])
    loss = loss_fn(img, txt, parts[-1][2])
    loss.backward()
    return loss.detach()


def _check_once(image_encoder: str, n: int, micro: int, dropout: float):
    torch.manual_seed(0)
    model = _tiny(image_encoder, dropout)
    images, captions = _batch(n)
    tokens = model.tokenizer(captions)
    loss_fn = FastClipLoss(backend="torch")

    torch.manual_seed(123)
    if dropout == 0.0:
        loss_ref = plain_step(model, images, tokens, loss_fn)
    else:
        loss_ref = _one_graph_step(model, images, tokens, loss_fn, micro)
    ref = _grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(123)
    loss_gc = grad_cache_step(model, images, tokens, loss_fn, micro)
    got = _grads(model)

    assert loss_gc.dtype == torch.float64
    assert set(got) == set(ref) and len(ref) == len(list(model.parameters()))
    torch.testing.assert_close(loss_gc, loss_ref, rtol=RTOL, atol=ATOL)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=RTOL, atol=ATOL, msg=f"grad of {k}")


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("image_encoder", ["cnn", "vit"])
@pytest.mark.parametrize("n, micro", [(10, 3), (9, 9), (7, 1), (1, 4), (33, 8)])
def test_grad_cache_matches_full_batch(image_encoder, n, micro, dropout):
    _check_once(image_encoder, n, micro, dropout)


def test_without_rng_replay_dropout_breaks_the_match(monkeypatch):
    """Negative control: the comparison above does detect a missing RNG replay."""
    monkeypatch.setattr(gradcache, "replay_rng", lambda state, device: contextlib.nullcontext())
    with pytest.raises(AssertionError):
        _check_once("vit", 10, 3, 0.2)


def test_dropout_is_active_so_the_rng_replay_matters():
    """Without the saved RNG states the re-run would draw other dropout masks."""
    torch.manual_seed(0)
    model = _tiny("vit", 0.2)
    images, captions = _batch(5)
    tokens = model.tokenizer(captions)
    a = model(images, tokens)
    b = model(images, tokens)
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_grad_cache_leaves_the_global_rng_where_the_embedding_pass_left_it():
    torch.manual_seed(0)
    model = _tiny("cnn", 0.2)
    images, captions = _batch(6)
    tokens = model.tokenizer(captions)
    torch.manual_seed(5)
    with torch.no_grad():
        for im, tk in zip(images.split(2), tokens.split(2)):
            model(im, tk)
    expected = torch.get_rng_state()
    torch.manual_seed(5)
    grad_cache_step(model, images, tokens, FastClipLoss(backend="torch"), 2)
    assert torch.equal(torch.get_rng_state(), expected)


def test_grad_cache_rejects_bad_arguments():
    model = _tiny("cnn", 0.0)
    images, captions = _batch(4)
    tokens = model.tokenizer(captions)
    with pytest.raises(ValueError, match="micro_batch_size"):
        grad_cache_step(model, images, tokens, FastClipLoss(), 0)
    with pytest.raises(ValueError, match="same batch size"):
        grad_cache_step(model, images, tokens[:3], FastClipLoss(), 2)


@pytest.mark.parametrize("n, micro, k", [(10, 3, 4), (7, 2, 7), (5, 8, 3), (6, 4, 0)])
def test_grad_cache_passes_group_ids_and_hard_negatives(n, micro, k):
    """With ``group_ids`` and hard-negative captions (text-only micro-batches, re-run before
    the paired ones) the cached step still gives the plain step's loss and gradients, and
    the plain step's loss is clip_loss with both options on the model's features."""
    torch.manual_seed(0)
    model = _tiny("cnn", 0.0)
    images, captions = _batch(n)
    negatives = [f"a photo of item {(i + 1) % 4} number {i + n}" for i in range(k)]
    all_tokens = model.tokenizer(captions + negatives)
    tokens, neg_tokens = all_tokens[:n], all_tokens[n:]
    ids = torch.arange(n) % 3
    loss_fn = FastClipLoss(backend="torch", label_smoothing=0.1, image_to_text_weight=0.7)

    loss_ref = plain_step(model, images, tokens, loss_fn, group_ids=ids, neg_tokens=neg_tokens)
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        img, txt, scale = model(images, tokens)
        neg = model(None, neg_tokens)[1]
        direct = clip_loss(img, txt, scale, group_ids=ids, negative_text_features=neg,
                           label_smoothing=0.1, image_to_text_weight=0.7, backend="torch")
        plain = clip_loss(img, txt, scale, label_smoothing=0.1, image_to_text_weight=0.7,
                          backend="torch")
    torch.testing.assert_close(loss_ref, direct, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(direct, plain)  # the options change this loss

    loss_gc = grad_cache_step(model, images, tokens, loss_fn, micro, group_ids=ids,
                              neg_tokens=neg_tokens)
    got = _grads(model)
    torch.testing.assert_close(loss_gc, loss_ref, rtol=RTOL, atol=ATOL)
    assert set(got) == set(ref) and len(ref) == len(list(model.parameters()))
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=RTOL, atol=ATOL, msg=f"grad of {key}")


def test_plain_step_needs_negative_tokens_of_the_tokens_width():
    model = _tiny("cnn", 0.0)
    images, captions = _batch(4)
    tokens = model.tokenizer(captions)
    with pytest.raises(ValueError, match="neg_tokens must have the tokens' shape"):
        plain_step(model, images, tokens, FastClipLoss(backend="torch"),
                   neg_tokens=tokens[:2, :-1])
