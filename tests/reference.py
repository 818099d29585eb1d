"""An independent float64 reference: the materialised loss, written plainly.

It builds the full N x N logits in float64 and uses torch's own cross-entropy and
autograd, sharing no code with clip_fast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_clip_loss(img, txt, scale, bias=None):
    """Loss in float64 and the gradients of all inputs (d_bias None without bias).

    Returns (loss, d_img, d_txt, d_scale, d_bias), all float64.
    """
    x = img.detach().double().requires_grad_(True)
    y = txt.detach().double().requires_grad_(True)
    s = torch.as_tensor(scale, dtype=torch.float64).detach().clone().reshape(()).requires_grad_(True)
    b = None
    if bias is not None:
        b = torch.as_tensor(bias, dtype=torch.float64).detach().clone().reshape(()).requires_grad_(True)
    logits = s * x @ y.T
    if b is not None:
        logits = logits + b
    labels = torch.arange(x.shape[0])
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    grads = torch.autograd.grad(loss, [x, y, s] + ([b] if b is not None else []))
    d_bias = grads[3] if b is not None else None
    return loss.detach(), grads[0], grads[1], grads[2], d_bias


def reference_block(img, txt, scale, bias=None):
    """Row/column log-sum-exp and the diagonal of one (M, K) block, float64."""
    logits = float(scale) * img.double() @ txt.double().T
    if bias is not None:
        logits = logits + float(bias)
    n = min(logits.shape)
    return (torch.logsumexp(logits, 1), torch.logsumexp(logits, 0),
            torch.diagonal(logits)[:n])


def reference_block_grads(img, txt, scale, bias, coef_row, coef_col, coef_diag):
    """d_img, d_txt, d_scale of the backend contract's G on one block, float64."""
    x, y = img.double(), txt.double()
    raw = x @ y.T
    logits = float(scale) * raw + (0.0 if bias is None else float(bias))
    p_row = torch.softmax(logits, 1)
    p_col = torch.softmax(logits, 0)
    eye = torch.eye(logits.shape[0], logits.shape[1], dtype=torch.float64)
    grad = coef_row * p_row + coef_col * p_col - coef_diag * eye
    return float(scale) * grad @ y, float(scale) * grad.T @ x, (grad * raw).sum()


def reference_block_magnitudes(img, txt, scale, bias, coef_row, coef_col, coef_diag):
    """The size of the terms that cancel in each output of one block's sweeps, float64.

    Fair tolerances scale with these, not with the (possibly tiny) result: an lse is
    compared with logits of size |S|, and each gradient sums G entries of both signs.
    Returns (logit, d_img, d_txt, d_scale) magnitudes as floats (each at least 1e-30).
    """
    x, y = img.detach().double().cpu(), txt.detach().double().cpu()
    raw = x @ y.T
    logits = float(scale) * raw + (0.0 if bias is None else float(bias))
    g_abs = (abs(coef_row) * torch.softmax(logits, 1) + abs(coef_col) * torch.softmax(logits, 0)
             + abs(coef_diag) * torch.eye(*logits.shape, dtype=torch.float64))
    s = abs(float(scale))
    return (logits.abs().max().item() + 1.0,
            s * (g_abs @ y.abs()).max().item() + 1e-30,
            s * (g_abs.T @ x.abs()).max().item() + 1e-30,
            (g_abs * raw.abs()).sum().item() + 1e-30)


def reference_magnitudes(img, txt, scale, bias=None):
    """reference_block_magnitudes for the symmetric CLIP loss on a square batch."""
    n = img.shape[0]
    return reference_block_magnitudes(img, txt, scale, bias, 1 / (2 * n), 1 / (2 * n), 1 / n)


def reference_siglip_loss(img, txt, scale, bias=None, group_ids=None, negative_only=False):
    """SigLIP's sigmoid loss in float64, materialised, and the gradients of all inputs.

    ``-sum_ij log sigmoid(z_ij S_ij) / N``, z = +1 on the diagonal (or where ``group_ids``
    are equal), -1 elsewhere; every z is -1 with ``negative_only``.
    Returns (loss, d_img, d_txt, d_scale, d_bias), all float64 (d_bias None without bias).
    """
    x = img.detach().double().requires_grad_(True)
    y = txt.detach().double().requires_grad_(True)
    s = torch.as_tensor(scale, dtype=torch.float64).detach().clone().reshape(()).requires_grad_(True)
    b = None
    if bias is not None:
        b = torch.as_tensor(bias, dtype=torch.float64).detach().clone().reshape(()).requires_grad_(True)
    logits = s * x @ y.T
    if b is not None:
        logits = logits + b
    if negative_only:
        pos = torch.zeros(logits.shape, dtype=torch.bool)
    elif group_ids is not None:
        ids = group_ids.cpu()
        pos = ids[:, None] == ids[None, :]
    else:
        pos = torch.eye(logits.shape[0], logits.shape[1], dtype=torch.bool)
    z = pos.double() * 2 - 1
    loss = -F.logsigmoid(z * logits).sum() / x.shape[0]
    grads = torch.autograd.grad(loss, [x, y, s] + ([b] if b is not None else []))
    d_bias = grads[3] if b is not None else None
    return loss.detach(), grads[0], grads[1], grads[2], d_bias
