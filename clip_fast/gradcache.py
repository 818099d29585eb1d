"""Gradient caching (GradCache, Gao et al. 2021): a contrastive batch larger than memory.

The contrastive loss couples every pair of the batch, but only through the
embeddings.  So one step over a batch of N is done in micro-batches of m:

1. embed all N samples in micro-batches without autograd, saving the RNG state
   before each micro-batch (dropout, stochastic layers);
2. compute the loss on the (N, D) embeddings as leaf tensors and backpropagate to
   them (FastClipLoss needs O(N * D) memory here, not O(N^2));
3. re-run each micro-batch with autograd under its saved RNG state (so dropout
   draws the same masks) and backpropagate its slice of the cached embedding
   gradient into the parameters.

Peak activation memory is that of one micro-batch; the parameter gradients equal
those of one autograd graph over the whole batch with the same dropout masks
(tests/train/test_gradcache.py checks this in float64, with and without dropout).
The cost is one extra forward pass.

The model returns ``(image_emb, text_emb, scale)`` or ``(image_emb, text_emb, scale,
bias)`` (SigLIP's learned bias); the loss takes the same arguments, and every scalar after
the embeddings gets its gradient too.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, List, Optional, Tuple

import torch
from torch import nn


def capture_rng(device: torch.device) -> dict:
    """The CPU RNG state and, on a CUDA device, that device's RNG state."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@contextlib.contextmanager
def replay_rng(state: dict, device: torch.device):
    """Run the block with the RNG state ``state``; the global RNG is untouched afterwards."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.set_rng_state(state["cpu"])
        if cuda:
            torch.cuda.set_rng_state(state["cuda"], device)
        yield


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision (autocast) outputs go to the loss in float32; float64 stays float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


LossFn = Callable[..., torch.Tensor]  # loss_fn(image_emb, text_emb, scale[, bias])


def _split_outputs(out) -> Tuple[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, ...]]:
    """``model(...)``'s ``(image_emb, text_emb, scale[, bias])`` as (img, txt, scalars)."""
    if not isinstance(out, (tuple, list)) or len(out) not in (3, 4):
        raise ValueError(f"the model must return (image_emb, text_emb, scale) or (image_emb, "
                         f"text_emb, scale, bias), got {type(out).__name__}"
                         + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    return out[0], out[1], tuple(out[2:])


def loss_extras(group_ids: Optional[torch.Tensor], negatives: Optional[torch.Tensor]) -> dict:
    """The per-batch loss keywords that are set (a loss without those keywords still works
    when neither is): ``group_ids`` and ``negative_text_features``."""
    extras = {}
    if group_ids is not None:
        extras["group_ids"] = group_ids
    if negatives is not None:
        extras["negative_text_features"] = negatives
    return extras


def plain_step(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, loss_fn: LossFn,
               autocast: Callable[[], ContextManager] = contextlib.nullcontext, *,
               group_ids: Optional[torch.Tensor] = None,
               neg_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One ordinary full-batch forward and backward; returns the detached loss.

    ``group_ids`` goes to the loss as is.  ``neg_tokens`` (hard-negative captions) are
    encoded by the text tower in the same forward call as ``tokens`` (one call, so a
    DistributedDataParallel wrapper sees one forward per backward; hence the same padded
    width) and go to the loss as ``negative_text_features``.
    """
    n_txt = tokens.shape[0]
    if neg_tokens is not None and neg_tokens.shape[1:] != tokens.shape[1:]:
        raise ValueError(f"neg_tokens must have the tokens' shape past the batch dimension (one "
                         f"tokenizer call pads both alike), got neg_tokens {tuple(neg_tokens.shape)} "
                         f"and tokens {tuple(tokens.shape)}")
    all_tokens = tokens if neg_tokens is None else torch.cat([tokens, neg_tokens])
    with autocast():
        img, txt, scalars = _split_outputs(model(images, all_tokens))
    txt, neg = (txt, None) if neg_tokens is None else (txt[:n_txt], txt[n_txt:])
    loss = loss_fn(_f32(img), _f32(txt), *(_f32(s) for s in scalars),
                   **loss_extras(group_ids, None if neg is None else _f32(neg)))
    loss.backward()
    return loss.detach()


def grad_cache_step(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                    loss_fn: LossFn, micro_batch_size: int,
                    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                    no_sync: Optional[Callable[[], ContextManager]] = None, *,
                    group_ids: Optional[torch.Tensor] = None,
                    neg_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One gradient-cached step: accumulates the full-batch gradients into ``.grad``.

    ``model(images, tokens)`` must return ``(image_emb, text_emb, scale)`` or
    ``(image_emb, text_emb, scale, bias)``; ``loss_fn`` takes the same arguments and is the
    contrastive loss (e.g. a FastClipLoss, or a FastSigLipLoss with the bias).  ``no_sync``
    (DistributedDataParallel.no_sync) is entered for every re-run but the last, so gradients
    are all-reduced once.  Returns the detached loss.

    ``group_ids`` ((N,), one per pair) goes to the loss with the whole batch's embeddings,
    whose rows keep the batch order.  ``neg_tokens`` (hard-negative captions) are embedded
    as text-only micro-batches of the same size (``model(None, tokens)``, the text
    embeddings in the second slot), passed to the loss as ``negative_text_features`` and
    re-run like the others; their re-runs come before the paired ones, so the last re-run,
    the one that synchronises, uses both towers.
    """
    n = images.shape[0]
    if tokens.shape[0] != n:
        raise ValueError(f"images and tokens must have the same batch size, got "
                         f"images {tuple(images.shape)} and tokens {tuple(tokens.shape)}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    img_chunks = images.split(micro_batch_size)
    tok_chunks = tokens.split(micro_batch_size)
    # No negatives on this process (None or zero rows): no text-only micro-batch.
    neg_chunks = () if neg_tokens is None or not neg_tokens.shape[0] else neg_tokens.split(micro_batch_size)
    # 1. Embed everything without autograd, remembering each micro-batch's RNG state.
    emb = _embed_without_grad(model, img_chunks, tok_chunks, neg_chunks, autocast, images.device)
    # 2. Loss and embedding gradients on leaf tensors (the scale and bias too).
    loss, grads = _cached_grads(emb, loss_fn, micro_batch_size, group_ids, neg_tokens is not None)
    # 3. Re-run each micro-batch with autograd and push its cached gradient through.
    _rerun(model, img_chunks, tok_chunks, neg_chunks, emb, grads, autocast, no_sync, images.device)
    return loss.detach()


class _Embedded:
    """Step 1's output: every micro-batch's embeddings (float32, no graph) and RNG states."""

    def __init__(self):
        self.img, self.txt, self.neg = [], [], []
        self.states: List[dict] = []
        self.neg_states: List[dict] = []
        self.scalars: tuple = ()


def _embed_without_grad(model, img_chunks, tok_chunks, neg_chunks, autocast, device) -> _Embedded:
    out = _Embedded()
    with torch.no_grad():
        for im, tk in zip(img_chunks, tok_chunks):
            out.states.append(capture_rng(device))
            with autocast():
                img, txt, out.scalars = _split_outputs(model(im, tk))
            out.img.append(_f32(img))
            out.txt.append(_f32(txt))
        for tk in neg_chunks:
            out.neg_states.append(capture_rng(device))
            with autocast():
                out.neg.append(_f32(model(None, tk)[1]))
    return out


def _cached_grads(emb: _Embedded, loss_fn, micro_batch_size: int, group_ids, has_neg: bool):
    """The loss over the whole batch's embeddings (as leaves) and their gradients, split
    back into micro-batches: (loss, (d_img, d_txt, d_scalars, d_neg))."""
    img_all = torch.cat(emb.img).requires_grad_(True)
    txt_all = torch.cat(emb.txt).requires_grad_(True)
    scalar_leaves = [_f32(s.detach()).requires_grad_(True) for s in emb.scalars]
    neg_all = None
    if has_neg:
        neg_all = (torch.cat(emb.neg) if emb.neg else
                   txt_all.new_zeros((0, txt_all.shape[1]))).requires_grad_(True)
    emb.img, emb.txt, emb.neg = [], [], []  # the batch's embeddings now live in the leaves only
    loss = loss_fn(img_all, txt_all, *scalar_leaves, **loss_extras(group_ids, neg_all))
    loss.backward()
    d_img = img_all.grad.split(micro_batch_size)
    d_txt = txt_all.grad.split(micro_batch_size)
    d_scalars = [s.grad for s in scalar_leaves]
    d_neg = () if neg_all is None or neg_all.grad is None else neg_all.grad.split(micro_batch_size)
    return loss, (d_img, d_txt, d_scalars, d_neg)


def _rerun(model, img_chunks, tok_chunks, neg_chunks, emb: _Embedded, grads, autocast, no_sync, device):
    """Step 3: the hard negatives' text-only micro-batches first, then the paired ones; only
    the last re-run synchronises (``no_sync`` for the others)."""
    d_img, d_txt, d_scalars, d_neg = grads
    for k, tk in enumerate(neg_chunks[:len(d_neg)]):
        sync = no_sync() if no_sync is not None else contextlib.nullcontext()
        with sync, replay_rng(emb.neg_states[k], device):
            with autocast():
                neg = model(None, tk)[1]
            (_f32(neg) * d_neg[k]).sum().backward()
    last = len(img_chunks) - 1
    for k, (im, tk) in enumerate(zip(img_chunks, tok_chunks)):
        sync = no_sync() if (no_sync is not None and k < last) else contextlib.nullcontext()
        with sync, replay_rng(emb.states[k], device):
            with autocast():
                img, txt, scalars = _split_outputs(model(im, tk))
            surrogate = (_f32(img) * d_img[k]).sum() + (_f32(txt) * d_txt[k]).sum()
            if k == last:  # the temperature's (and bias's) gradient enters once
                for s, d_s in zip(scalars, d_scalars):
                    if d_s is not None:
                        surrogate = surrogate + _f32(s) * d_s
            surrogate.backward()
