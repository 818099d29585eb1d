"""Tiny random-init transformers dual encoders (CLIP, SigLIP, SigLIP 2), built offline from
configs, random inputs for them, and the gradient comparison their tests share.  One 16-wide
layer per tower, projection 8."""
from __future__ import annotations

import torch

VOCAB, SEQ, CHANNELS, IMAGE, PATCH = 40, 6, 3, 8, 4
KINDS = ("clip", "siglip", "siglip2")


def _towers():
    # eos_token_id 2: CLIP's text tower pools at each row's largest id, so any random ids work
    text = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_channels=CHANNELS, patch_size=PATCH)
    return text, vision


def tiny_model(kind, seed=0, dtype=torch.float64):
    """A random-init ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` in ``dtype`` (eval mode:
    no dropout in any of them at these configs)."""
    import transformers

    text, vision = _towers()
    torch.manual_seed(seed)
    if kind == "clip":
        config = transformers.CLIPConfig(text_config=text, vision_config=dict(vision, image_size=IMAGE),
                                         projection_dim=8)
        model = transformers.CLIPModel(config)
    elif kind == "siglip":
        config = transformers.SiglipConfig(text_config=text, vision_config=dict(vision, image_size=IMAGE))
        model = transformers.SiglipModel(config)
    elif kind == "siglip2":
        patches = (IMAGE // PATCH) ** 2
        config = transformers.Siglip2Config(text_config=text, vision_config=dict(vision, num_patches=patches))
        model = transformers.Siglip2Model(config)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    with torch.no_grad():  # a logit_bias away from its init, so its gradient is tested on a generic value
        if hasattr(model, "logit_bias"):
            model.logit_bias.fill_(-2.5)
            model.logit_scale.fill_(1.7)
    return model.to(dtype)


def batch(kind, n, gen, dtype=torch.float64):
    """Model inputs for ``n`` pairs drawn from ``gen``: token ids, a padding mask, pixels."""
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
    out = dict(input_ids=ids)
    if kind == "clip":
        out["attention_mask"] = (torch.arange(SEQ) < torch.randint(2, SEQ + 1, (n, 1), generator=gen)).long()
    if kind == "siglip2":
        side = IMAGE // PATCH
        out["pixel_values"] = torch.randn(n, side * side, CHANNELS * PATCH * PATCH, generator=gen, dtype=dtype)
        out["pixel_attention_mask"] = torch.ones(n, side * side, dtype=torch.long)
        out["spatial_shapes"] = torch.tensor([[side, side]] * n)
    else:
        out["pixel_values"] = torch.randn(n, CHANNELS, IMAGE, IMAGE, generator=gen, dtype=dtype)
    return out


# Gradients that transformers rounds to float32 whatever the model's dtype: on CPU SigLIP 2
# resizes its position embeddings in float32 (Siglip2VisionEmbeddings.resize_positional_embeddings),
# so in a float64 model two runs whose upstream gradients differ in the last float64 bit can
# differ by float32 roundings there.  They are judged at FLOAT32_GRAD_TOL.
FLOAT32_GRADS = {"siglip2": ("vision_model.embeddings.position_embedding.weight",)}
FLOAT32_GRAD_TOL = 1e-6  # about 17 float32 units


def grad_tolerance(kind, name, tol):
    """``tol`` for parameter ``name`` of a ``kind`` model, or FLOAT32_GRAD_TOL for a float32 one."""
    return max(tol, FLOAT32_GRAD_TOL) if name in FLOAT32_GRADS.get(kind, ()) else tol


def rel_diff(got, want):
    """|got - want| / |want| in float64 (0 when both are 0)."""
    scale = want.double().norm()
    diff = (got.double() - want.double()).norm()
    return (diff / scale).item() if scale > 0 else (0.0 if diff == 0 else float("inf"))


def total_norm(grads):
    """The norm of all the gradients together, float64."""
    return torch.cat([g.double().flatten() for g in grads.values() if g is not None]).norm().item()


def _grad_rel(got, want, total):
    """Relative difference of one parameter's gradient.  A gradient that is zero in exact
    arithmetic (a key projection's bias: softmax ignores a shift shared by a row) is rounding
    noise in both runs, so the denominator is at least 1e-6 x the whole model's gradient norm."""
    return (got.double() - want.double()).norm().item() / max(want.double().norm().item(), 1e-6 * total)


def assert_grads_close(got, want, tol, kind, what=""):
    """Each parameter's gradient within ``tol`` (``_grad_rel``; FLOAT32_GRAD_TOL for the
    gradients transformers computes in float32); a parameter without a gradient on one side
    counts as zero."""
    total = total_norm(want)
    for name, g_ref in want.items():
        if g_ref is not None:
            g = got.get(name)
            rel = _grad_rel(torch.zeros_like(g_ref) if g is None else g, g_ref, total)
            assert rel <= grad_tolerance(kind, name, tol), f"{what} {name}: {rel:.3e}"
