"""Test inputs shared by the loss tests (no clip_fast imports: inputs only)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def features(m, d, dtype=torch.float32, normalise=True, device="cpu"):
    """(m, d) random rows, unit-norm by default, drawn in float64 and cast once."""
    x = torch.randn(m, d, dtype=torch.float64)
    if normalise:
        x = F.normalize(x, dim=1)
    return x.to(device=device, dtype=dtype)


def paired_features(m, k, d, dtype=torch.float32, normalise=True, device="cpu"):
    """(m, d) image rows and (k, d) text rows whose first min(m, k) rows are paired
    (text = 0.6 image + 0.8 noise), so the CLIP loss is not trivially log N."""
    img = torch.randn(m, d, dtype=torch.float64)
    txt = torch.randn(k, d, dtype=torch.float64)
    n = min(m, k)
    txt[:n] = 0.6 * img[:n] + 0.8 * txt[:n]
    if normalise:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    return img.to(device=device, dtype=dtype), txt.to(device=device, dtype=dtype)
