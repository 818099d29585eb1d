"""An independent float64 reference: the materialised loss, written plainly.

It builds the full N x N logits in float64 and uses torch's own cross-entropy and
autograd, sharing no code with clip_fast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _leaves(img, txt, scale, bias):
    """float64 leaf copies of the inputs, for torch's autograd (bias None stays None)."""
    def scalar(v):
        return torch.as_tensor(v, dtype=torch.float64).detach().clone().reshape(()).requires_grad_(True)

    return (img.detach().double().requires_grad_(True), txt.detach().double().requires_grad_(True),
            scalar(scale), None if bias is None else scalar(bias))


def reference_clip_loss(img, txt, scale, bias=None):
    """Loss in float64 and the gradients of all inputs (d_bias None without bias).

    Returns (loss, d_img, d_txt, d_scale, d_bias), all float64.
    """
    x, y, s, b = _leaves(img, txt, scale, bias)
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


def reference_block_scale_split(img, txt, scale, bias, coef_row, coef_col, coef_diag, diag_given):
    """The contract's split d_scale of one block, float64: [the row term's share, the rest].

    With ``diag_given`` the diagonal (the forward's, in the backends) counts wholly as the rest.
    """
    x, y = img.double(), txt.double()
    raw = x @ y.T
    logits = float(scale) * raw + (0.0 if bias is None else float(bias))
    eye = torch.eye(logits.shape[0], logits.shape[1], dtype=torch.float64)
    row = coef_row * torch.softmax(logits, 1)
    grad = row + coef_col * torch.softmax(logits, 0) - coef_diag * eye
    if diag_given:
        row = row * (1 - eye)
    row_part = (row * raw).sum()
    return torch.stack([row_part, (grad * raw).sum() - row_part])


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
    x, y, s, b = _leaves(img, txt, scale, bias)
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


def family_targets(n, k_extra, ids=None, eps=0.0):
    """The (n, n + k_extra) target matrix of one direction's softmax, float64: uniform over
    each row's positives (equal ids, or the pair alone), smoothed by eps over every class."""
    ids = torch.arange(n) if ids is None else ids.cpu()
    pos = (ids[:, None] == ids[None, :]).double()
    q = torch.zeros(n, n + k_extra, dtype=torch.float64)
    q[:, :n] = pos / pos.sum(1, keepdim=True)
    return (1.0 - eps) * q + eps / (n + k_extra)


def reference_family_loss(img, txt, scale, bias=None, group_ids=None, label_smoothing=0.0,
                          image_to_text_weight=0.5, negative_text=None, negative_image=None,
                          row_weights=None, col_weights=None, dtype=torch.float64):
    """The CLIP loss with positive groups, label smoothing, direction weights and hard
    negatives, materialised in float64: soft-target cross-entropy over
    S = scale * [img; negative_image] @ [txt; negative_text].T + bias.

    ``row_weights`` / ``col_weights`` (n,) default to lam / n and (1 - lam) / n: the weight
    of each image row's and text column's cross-entropy (a rank's share of a distributed
    loss puts zeros on the other ranks' rows and columns).
    Returns (loss, d_img, d_txt, d_scale, d_bias, d_negative_text, d_negative_image),
    float64 (None for absent inputs).  ``dtype``: the whole computation in that dtype instead
    (the materialised loss of the precision rule).
    """
    def leaf(t):
        return None if t is None else t.detach().to(dtype).requires_grad_(True)

    def scalar(v):
        return None if v is None else torch.as_tensor(v, dtype=dtype).detach().clone().reshape(()).requires_grad_(True)

    x, y, nt, ni = leaf(img), leaf(txt), leaf(negative_text), leaf(negative_image)
    s, b = scalar(scale), scalar(bias)
    loss = _family_graph(x, y, s, b, nt, ni, group_ids, label_smoothing, image_to_text_weight,
                         row_weights, col_weights, dtype)
    inputs = [t for t in (x, y, s, b, nt, ni) if t is not None]
    grads = iter(torch.autograd.grad(loss, inputs, allow_unused=True))
    out = [loss.detach()] + [None if t is None else next(grads) for t in (x, y, s, b, nt, ni)]
    return tuple(out)


def _family_graph(x, y, s, b, nt, ni, group_ids, label_smoothing, image_to_text_weight,
                  row_weights, col_weights, dtype):
    """The generalised CLIP loss of ``reference_family_loss`` as an autograd graph."""
    n = x.shape[0]
    rows = x if ni is None else torch.cat([x, ni])
    cols = y if nt is None else torch.cat([y, nt])
    logits = s * rows @ cols.T
    if b is not None:
        logits = logits + b
    lam = image_to_text_weight
    a = torch.full((n,), lam / n, dtype=dtype) if row_weights is None else row_weights.to(dtype)
    c = torch.full((n,), (1 - lam) / n, dtype=dtype) if col_weights is None else col_weights.to(dtype)
    q_row = family_targets(n, cols.shape[0] - n, group_ids, label_smoothing).to(dtype)
    q_col = family_targets(n, rows.shape[0] - n, group_ids, label_smoothing).to(dtype)
    ce_row = -(q_row * torch.log_softmax(logits[:n, :], dim=1)).sum(1)
    ce_col = -(q_col * torch.log_softmax(logits[:, :n].T, dim=1)).sum(1)
    return (a * ce_row).sum() + (c * ce_col).sum()


def reference_matryoshka_loss(img, txt, scale, dims, weights=None, renormalize=True, bias=None,
                              group_ids=None, label_smoothing=0.0, image_to_text_weight=0.5,
                              negative_text=None, negative_image=None, dtype=torch.float64):
    """sum_k w_k * the generalised CLIP loss (``reference_family_loss``) on the first d_k
    dimensions of every feature (L2-normalised per prefix with ``renormalize``), one separate
    materialised loss per size, in ``dtype`` (float64 by default) with autograd through the
    normalisation.  Returns (loss, d_img, d_txt, d_scale, d_negative_text, d_negative_image)."""
    def leaf(t):
        return None if t is None else t.detach().to(dtype).requires_grad_(True)

    x, y, nt, ni = leaf(img), leaf(txt), leaf(negative_text), leaf(negative_image)
    s = torch.as_tensor(scale, dtype=dtype).detach().clone().reshape(()).requires_grad_(True)
    b = None if bias is None else torch.as_tensor(bias, dtype=dtype).detach().clone().reshape(())
    weights = [1.0] * len(dims) if weights is None else weights

    def cut(t, d):
        if t is None:
            return None
        return F.normalize(t[:, :d], dim=1) if renormalize else t[:, :d]

    loss = sum(w * _family_graph(cut(x, d), cut(y, d), s, b, cut(nt, d), cut(ni, d), group_ids,
                                 label_smoothing, image_to_text_weight, None, None, dtype)
               for d, w in zip(dims, weights))
    inputs = [t for t in (x, y, s, nt, ni) if t is not None]
    grads = iter(torch.autograd.grad(loss, inputs))
    return tuple([loss.detach()] + [None if t is None else next(grads) for t in (x, y, s, nt, ni)])


def reference_matryoshka_siglip_loss(img, txt, scale, dims, weights=None, renormalize=True, bias=None,
                                     group_ids=None, dtype=torch.float64):
    """sum_k w_k * open_clip's SigLipLoss (``-sum_ij log sigmoid(z_ij S_ij) / N``, z = +1 on the
    diagonal or equal ``group_ids``) on the first d_k dimensions of both features
    (L2-normalised per prefix with ``renormalize``), one separate materialised loss per size,
    in ``dtype`` (float64 by default) with autograd through the normalisation.
    Returns (loss, d_img, d_txt, d_scale, d_bias) (d_bias None without bias)."""
    x = img.detach().to(dtype).requires_grad_(True)
    y = txt.detach().to(dtype).requires_grad_(True)
    s = torch.as_tensor(scale, dtype=dtype).detach().clone().reshape(()).requires_grad_(True)
    b = None if bias is None else torch.as_tensor(bias, dtype=dtype).detach().clone().reshape(()).requires_grad_(True)
    weights = [1.0] * len(dims) if weights is None else weights
    n = x.shape[0]
    pos = torch.eye(n, dtype=torch.bool) if group_ids is None else group_ids.cpu()[:, None] == group_ids.cpu()[None, :]
    z = pos.to(dtype) * 2 - 1
    loss = 0.0
    for d, w in zip(dims, weights):
        xd, yd = (F.normalize(x[:, :d], dim=1), F.normalize(y[:, :d], dim=1)) if renormalize else (x[:, :d], y[:, :d])
        logits = s * xd @ yd.T
        if b is not None:
            logits = logits + b
        loss = loss + w * (-F.logsigmoid(z * logits).sum() / n)
    grads = torch.autograd.grad(loss, [x, y, s] + ([b] if b is not None else []))
    return loss.detach(), grads[0], grads[1], grads[2], (grads[3] if b is not None else None)


def reference_family_distributed(imgs, txts, scale, *, ids=None, eps=0.0, lam=0.5, neg_txts=None,
                                 neg_imgs=None, local_loss=True, gather_with_grad=True, upstream=None,
                                 bias=None, dtype=torch.float64, matryoshka=None):
    """Every rank's share of the generalised CLIP loss, materialised in float64 (or, with
    ``dtype``, in that dtype throughout: the materialised loss of the precision rule).

    Per-rank shards (lists): features, ids, hard negatives (None: not given; (0, D) allowed).
    Rank r's loss is open_clip's ``ClipLoss`` on its shard generalised to the options:
    with local_loss, lam * mean over its image rows of CE(row, q) + (1 - lam) * mean over its
    text rows of CE(row, q'), each row a softmax over every rank's texts and negative texts
    (images and negative images); without, the global loss.  The gathered copies are built
    as open_clip's ``gather_features`` builds them (with grad, or detached with the own shard
    re-inserted when not local_loss), negatives the same way.  Targets: explicit matrices,
    uniform over a row's positives (equal ids) with label smoothing eps over all its classes.
    ``matryoshka``: (dims, weights, renormalize), or None: rank r's loss is then
    sum_k weights_k * that loss on the first dims_k columns of every feature (L2-normalised per
    row with ``renormalize``), the prefixes cut from the gathered copies (autograd through them).
    Returns per rank (loss, d_img, d_txt, d_scale, d_neg_txt, d_neg_img, d_bias) of
    sum_r upstream_r * loss_r, float64 (d_neg_* None when not given, d_bias None without bias).
    """
    w = len(imgs)
    upstream = upstream or [1.0] * w
    leaf = lambda x: x.detach().to(dtype).requires_grad_(True)  # noqa: E731
    I, T = [leaf(x) for x in imgs], [leaf(x) for x in txts]
    NT = None if neg_txts is None else [leaf(x) for x in neg_txts]
    NI = None if neg_imgs is None else [leaf(x) for x in neg_imgs]
    S = [torch.tensor(float(scale), dtype=dtype, requires_grad=True) for _ in range(w)]
    B = [torch.tensor(float(bias or 0.0), dtype=dtype, requires_grad=True) for _ in range(w)]
    sizes = [x.shape[0] for x in imgs]
    n = sum(sizes)
    all_ids = None if ids is None else torch.cat([x.cpu().long() for x in ids])
    m_t = 0 if NT is None else sum(x.shape[0] for x in NT)
    m_i = 0 if NI is None else sum(x.shape[0] for x in NI)
    q_row = family_targets(n, m_t, all_ids, eps).to(dtype)   # image rows over [texts, negative texts]
    q_col = family_targets(n, m_i, all_ids, eps).to(dtype)   # text rows over [images, negative images]

    def gathered(parts, r):
        if parts is None:
            return None
        if gather_with_grad:
            return torch.cat(parts)
        copies = [x.detach() for x in parts]
        if not local_loss:
            copies[r] = parts[r]
        return torch.cat(copies)

    def with_negs(x, negs):
        return x if negs is None else torch.cat([x, negs])

    def rank_loss(r, cut):
        all_i, all_t = cut(gathered(I, r)), cut(gathered(T, r))
        cols_t, cols_i = with_negs(all_t, cut(gathered(NT, r))), with_negs(all_i, cut(gathered(NI, r)))
        if local_loss:
            o = sum(sizes[:r])
            rows = slice(o, o + sizes[r])
            per_img, per_txt = S[r] * cut(I[r]) @ cols_t.T, S[r] * cut(T[r]) @ cols_i.T
            qr, qc = q_row[rows], q_col[rows]
        else:
            per_img, per_txt = S[r] * all_i @ cols_t.T, S[r] * all_t @ cols_i.T
            qr, qc = q_row, q_col
        if bias is not None:
            per_img, per_txt = per_img + B[r], per_txt + B[r]
        ce_row = -(qr * F.log_softmax(per_img, 1)).sum(1)
        ce_col = -(qc * F.log_softmax(per_txt, 1)).sum(1)
        return lam * ce_row.mean() + (1 - lam) * ce_col.mean()

    def prefix(d, renormalize):
        def cut(t):
            if t is None:
                return None
            return F.normalize(t[:, :d], dim=1) if renormalize else t[:, :d]
        return cut

    losses = []
    for r in range(w):
        if matryoshka is None:
            losses.append(rank_loss(r, lambda t: t))
        else:
            dims, weights, renormalize = matryoshka
            weights = [1.0] * len(dims) if weights is None else weights
            losses.append(sum(wk * rank_loss(r, prefix(d, renormalize)) for d, wk in zip(dims, weights)))
    total = sum(u * l for u, l in zip(upstream, losses))
    leaves = I + T + S + B + (NT or []) + (NI or [])
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    gi, gt, gs, gb = grads[:w], grads[w:2 * w], grads[2 * w:3 * w], grads[3 * w:4 * w]
    rest = grads[4 * w:]
    gnt = rest[:w] if NT is not None else [None] * w
    gni = rest[len(NT or []):] if NI is not None else [None] * w
    return [(losses[r].detach(), gi[r], gt[r], gs[r], gnt[r], gni[r], gb[r] if bias is not None else None)
            for r in range(w)]
