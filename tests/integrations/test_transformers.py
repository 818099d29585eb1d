"""The fused ``return_loss`` of transformers' CLIPModel, SiglipModel and Siglip2Model against
transformers' own loss, on one process.

The oracle is the unpatched model itself (transformers' materialised loss); nothing of
clip_fast is in it.  Tiny random-init towers (tests/integrations/hf_tiny_models.py), odd
batches of 5 and 7 pairs: float64 loss and every parameter's gradient within a relative 1e-9;
fp32 within the precision rule (PRECISION_FACTOR x transformers' own fp32 error against
float64, over 4 seeds).  Then the switch's behaviour: logits policy, tuple outputs, positional
``return_loss``, restoring the originals, per-instance apply, bad options.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from helpers import DTYPE_UNIT, PRECISION_FACTOR, seed_ratio

pytest.importorskip("transformers", reason="the transformers extra is not installed")

from hf_tiny_models import KINDS, assert_grads_close, batch, rel_diff as _rel, tiny_model, total_norm  # noqa: E402

from clip_fast.integrations.transformers import (  # noqa: E402
    FastLossOptions, apply_fast_loss, remove_fast_loss, supported_models, use_fast_hf_losses)


def _loss_and_grads(model, inputs, **call):
    """(loss, {parameter name: gradient or None}) of ``model(**inputs, return_loss=True)``."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, return_loss=True, **call).loss
    loss.backward()
    return loss.detach(), {name: (None if p.grad is None else p.grad.clone())
                           for name, p in model.named_parameters()}


def _both(kind, n, seed, dtype=torch.float64, **options):
    """transformers' and the switch's (loss, grads) on one model and one batch."""
    model = tiny_model(kind, seed=seed, dtype=dtype)
    inputs = batch(kind, n, torch.Generator().manual_seed(seed + 100), dtype=dtype)
    want = _loss_and_grads(model, inputs)
    with use_fast_hf_losses(**options):
        got = _loss_and_grads(model, inputs)
    return got, want


def _assert_close(got, want, tol, kind):
    (loss, grads), (loss_ref, grads_ref) = got, want
    assert _rel(loss, loss_ref) <= tol, f"{kind} loss {loss.item()!r} vs {loss_ref.item()!r}"
    assert grads.keys() == grads_ref.keys()
    for name, g_ref in grads_ref.items():
        assert (grads[name] is None) == (g_ref is None), f"{kind} {name}: gradient presence differs"
    assert_grads_close(grads, grads_ref, tol, kind, kind)


@pytest.mark.parametrize("n", [5, 7])
@pytest.mark.parametrize("kind", KINDS)
def test_float64_loss_and_every_parameter_gradient_match_transformers(kind, n):
    """Loss and every parameter's gradient, logit_scale (and logit_bias) included, within 1e-9."""
    got, want = _both(kind, n, seed=n)
    _assert_close(got, want, 1e-9, kind)
    assert got[1]["logit_scale"].abs().sum() > 0  # the scale's gradient is really compared
    if kind != "clip":
        assert got[1]["logit_bias"].abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_float32_within_precision_rule(kind):
    """fp32: the switch's error against transformers' float64 loss (same weights) is at most
    PRECISION_FACTOR x transformers' own fp32 error, geometric mean over 4 seeds, for the
    loss and each parameter gradient (the floor of one fp32 unit is taken on the whole
    gradient's norm: an exactly-zero gradient is rounding noise in both runs)."""
    errors = {}
    for seed in range(4):
        model = tiny_model(kind, seed=seed, dtype=torch.float32)
        inputs = batch(kind, 7, torch.Generator().manual_seed(seed + 100), dtype=torch.float32)
        lib = _loss_and_grads(model, inputs)
        with use_fast_hf_losses():
            fast = _loss_and_grads(model, inputs)
        inputs64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
        truth = _loss_and_grads(model.double(), inputs64)
        unit = DTYPE_UNIT[torch.float32] * total_norm(truth[1])
        for name, want in [("loss", truth[0])] + list(truth[1].items()):
            if want is None:
                continue
            got = fast[0] if name == "loss" else fast[1][name]
            ref32 = lib[0] if name == "loss" else lib[1][name]
            floor = max((ref32.double() - want).norm().item(), DTYPE_UNIT[torch.float32] * want.norm().item(),
                        0.0 if name == "loss" else unit)
            errors.setdefault(name, []).append(((got.double() - want).norm().item(), floor))
    for name, pairs in errors.items():
        ratio = seed_ratio(*zip(*pairs))
        assert ratio <= PRECISION_FACTOR, f"{kind} {name}: {ratio:.2f} x transformers' fp32 error"


@pytest.mark.parametrize("kind", KINDS)
def test_default_output_keeps_every_field(kind):
    """logits="keep": every field of transformers' output is there and equal, logits with autograd."""
    model = tiny_model(kind)
    inputs = batch(kind, 5, torch.Generator().manual_seed(3))
    want = model(**inputs, return_loss=True)
    with use_fast_hf_losses():
        got = model(**inputs, return_loss=True)
    assert type(got) is type(want) and list(got.keys()) == list(want.keys())
    for key in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
        assert torch.equal(got[key], want[key]), key
    assert got.logits_per_image.requires_grad


def test_logits_none_drops_the_logits_and_keeps_the_loss():
    """logits="none": with return_loss the two logits fields are None; the loss is unchanged;
    without return_loss the output is transformers' own."""
    model = tiny_model("siglip")
    inputs = batch("siglip", 5, torch.Generator().manual_seed(4))
    want = model(**inputs, return_loss=True)
    with use_fast_hf_losses(logits="none"):
        got = model(**inputs, return_loss=True)
        plain = model(**inputs)
    assert got.logits_per_image is None and got.logits_per_text is None
    assert "logits_per_image" not in got.keys()
    assert _rel(got.loss, want.loss) <= 1e-9
    assert torch.equal(plain.logits_per_image, want.logits_per_image) and plain.loss is None


@pytest.mark.parametrize("kind", ["clip", "siglip2"])
def test_tuple_output_and_positional_return_loss(kind):
    """return_dict=False gives transformers' tuple (loss first); return_loss given positionally works."""
    model = tiny_model(kind)
    inputs = batch(kind, 5, torch.Generator().manual_seed(5))
    want = model(**inputs, return_loss=True, return_dict=False)
    names = list(inspect.signature(model.forward).parameters)
    positional = [inputs.get(name) for name in names[:names.index("return_loss")]]
    rest = {k: v for k, v in inputs.items() if k not in names[:names.index("return_loss")]}
    with use_fast_hf_losses():
        got = model(**inputs, return_loss=True, return_dict=False)
        by_position = model(*positional, True, **rest)
    assert isinstance(got, tuple) and len(got) == len(want)
    assert _rel(got[0], want[0]) <= 1e-9 and _rel(by_position.loss, want[0]) <= 1e-9
    assert all(torch.equal(g, w) for g, w in zip(got[1:3], want[1:3]))


def test_context_manager_restores_the_originals_even_on_error():
    """On exit (normal or by an exception) every class's own forward is back, unwrapped."""
    before = {cls: cls.__dict__["forward"] for cls, _ in supported_models()}
    with use_fast_hf_losses():
        assert all(cls.__dict__["forward"] is not f for cls, f in before.items())
    with pytest.raises(RuntimeError, match="inside"):
        with use_fast_hf_losses():
            raise RuntimeError("inside")
    assert all(cls.__dict__["forward"] is f for cls, f in before.items())


def test_forward_signature_is_the_models():
    """Trainer reads forward's signature (to keep dataset columns, to see return_loss): unchanged."""
    model = tiny_model("clip")
    want = inspect.signature(model.forward)
    with use_fast_hf_losses():
        assert inspect.signature(model.forward) == want
    assert inspect.signature(apply_fast_loss(model).forward) == want


def test_apply_to_one_instance_and_remove():
    """apply_fast_loss changes one instance (options of its own), remove_fast_loss undoes it;
    another instance of the class stays transformers'."""
    fast, other = tiny_model("clip"), tiny_model("clip")
    inputs = batch("clip", 5, torch.Generator().manual_seed(6))
    want = other(**inputs, return_loss=True)
    apply_fast_loss(fast, logits="none")
    got = fast(**inputs, return_loss=True)
    assert got.logits_per_image is None and _rel(got.loss, want.loss) <= 1e-9
    assert other(**inputs, return_loss=True).logits_per_image is not None
    apply_fast_loss(fast)  # again: replaces the options, does not wrap twice
    assert fast(**inputs, return_loss=True).logits_per_image is not None
    remove_fast_loss(fast)
    assert torch.equal(fast(**inputs, return_loss=True).loss, want.loss)  # transformers' own again


def test_copies_of_an_applied_model_use_their_own_parameters():
    """The switch travels with the instance (nn.DataParallel's replicas, deepcopy): a copy's
    loss and gradients come from the copy's parameters, not the original's."""
    import copy

    model = apply_fast_loss(tiny_model("siglip"))
    inputs = batch("siglip", 5, torch.Generator().manual_seed(8))
    shallow = model._replicate_for_data_parallel()  # what DataParallel's replicate() starts from
    shallow._parameters.update(model._parameters)  # replicate() then fills in device copies
    for replica in (copy.deepcopy(model), shallow):
        replica.logit_bias = torch.nn.Parameter(torch.full((1,), 0.5, dtype=torch.float64))
        got = replica(**inputs, return_loss=True)
        want = tiny_model("siglip")
        want.logit_bias = torch.nn.Parameter(torch.full((1,), 0.5, dtype=torch.float64))
        assert _rel(got.loss, want(**inputs, return_loss=True).loss) <= 1e-9
        got.loss.backward()
        assert replica.logit_bias.grad is not None and model.logit_bias.grad is None


def test_apply_inside_the_context_manager_outlives_it():
    """An instance switched on inside the block keeps its options after the block; a plain
    instance is transformers' again."""
    fast, plain = tiny_model("clip"), tiny_model("clip")
    inputs = batch("clip", 5, torch.Generator().manual_seed(9))
    with use_fast_hf_losses():
        apply_fast_loss(fast, logits="none")
    assert fast(**inputs, return_loss=True).logits_per_image is None
    assert plain(**inputs, return_loss=True).logits_per_image is not None
    remove_fast_loss(fast)


def test_bad_options_and_unsupported_models_raise_naming_them():
    with pytest.raises(ValueError, match="distributed must be one of .* got 'all'"):
        FastLossOptions(distributed="all")
    with pytest.raises(ValueError, match="logits must be one of"):
        use_fast_hf_losses(logits="detach").__enter__()
    with pytest.raises(ValueError, match="siglip_dist_impl must be one of"):
        apply_fast_loss(tiny_model("siglip"), siglip_dist_impl="ring")
    with pytest.raises(ValueError, match="chunk_size"):
        FastLossOptions(chunk_size=0)
    with pytest.raises(TypeError, match="got a Linear; supported models are CLIPModel"):
        apply_fast_loss(torch.nn.Linear(2, 2))
    own_forward = type("MyClip", (type(tiny_model("clip")),), {"forward": lambda self, **kw: None})
    with pytest.raises(TypeError, match="MyClip overrides CLIPModel.forward"):
        apply_fast_loss(own_forward.__new__(own_forward))
