"""Zero-shot classification, CLIP's recipe.

Each class's text embedding is the average over prompt templates: embed every
``template.format(classname)``, L2-normalise each, average, renormalise.  An image
is assigned the class whose embedding has the largest cosine similarity.

Works with any model offering ``encode_image(images)`` and ``encode_text(tokens)``
(open_clip's models included) and a tokenizer mapping a list of strings to tokens.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def zero_shot_classifier(model, classnames: Sequence[str], templates: Sequence[str],
                         tokenizer: Optional[Callable] = None,
                         device: Optional[torch.device] = None) -> torch.Tensor:
    """Return the ``(embed_dim, num_classes)`` matrix of class text embeddings (unit columns)."""
    if not classnames:
        raise ValueError("classnames is empty")
    if not templates:
        raise ValueError("templates is empty")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("pass tokenizer= (the model has no .tokenizer)")
    device = device if device is not None else _model_device(model)
    columns = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
        columns.append(F.normalize(emb.mean(dim=0), dim=0))
    return torch.stack(columns, dim=1)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor,
                 topk: Sequence[int] = (1, 5)) -> Dict[int, int]:
    """Number of samples whose label is among the ``k`` largest logits, for each ``k``."""
    if logits.dim() != 2 or tuple(labels.shape) != (logits.shape[0],):
        raise ValueError(f"topk_correct needs logits (N, C) and labels (N,), got logits "
                         f"{tuple(logits.shape)} and labels {tuple(labels.shape)}")
    if not topk or any(k < 1 for k in topk):
        raise ValueError(f"topk must be a non-empty list of ks >= 1, got {tuple(topk)}")
    kmax = min(max(topk), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices
    hit = pred == labels[:, None]
    return {k: int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in topk}


Batches = Iterable[Tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def zero_shot_eval(model, classifier: Union[torch.Tensor, Dict[str, torch.Tensor]],
                   data: Union[Batches, Tuple[torch.Tensor, torch.Tensor]],
                   batch_size: int = 1000, topk: Sequence[int] = (1, 5),
                   device: Optional[torch.device] = None,
                   autocast: Optional[Callable] = None) -> Dict[str, float]:
    """Top-k zero-shot accuracy of ``model`` with one classifier or several.

    ``data`` is an ``(images, labels)`` pair of tensors (split into ``batch_size``
    chunks) or an iterable of such batches.  ``classifier`` is a matrix from
    :func:`zero_shot_classifier` or a dict ``{name: matrix}``; results are keyed
    ``top1``/``top5`` (single matrix) or ``<name>_top1`` ... (dict).
    """
    device = device if device is not None else _model_device(model)
    classifiers = classifier if isinstance(classifier, dict) else {"": classifier}
    classifiers = {name: clf.to(device) for name, clf in classifiers.items()}  # once, not per batch
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images, labels = data
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                             f"differ in length")
        data = zip(images.split(batch_size), labels.split(batch_size))
    correct = {name: {k: 0 for k in topk} for name in classifiers}
    total = 0
    for images, labels in data:
        images, labels = images.to(device), labels.to(device)
        with autocast() if autocast is not None else contextlib.nullcontext():
            feats = model.encode_image(images)
        feats = F.normalize(feats.float(), dim=-1)
        for name, clf in classifiers.items():
            for k, c in topk_correct(feats @ clf, labels, topk).items():
                correct[name][k] += c
        total += labels.shape[0]
    if total == 0:
        raise ValueError("zero_shot_eval got no samples")
    out = {}
    for name in classifiers:
        prefix = f"{name}_" if name else ""
        for k in topk:
            out[f"{prefix}top{k}"] = correct[name][k] / total
    return out
