"""Helpers the gather and ring Functions share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from ...core.numerics import compute_dtype
from ..targets import block_targets
from .agreement import Layout
from .sweeps import make_sweeps


def sweep_setup(layout: Layout, scale, img: torch.Tensor):
    """What every distributed Function's forward and backward start from: ``(ops, s, acc,
    tg)``, the block sweeps (``sweeps.PlainSweeps`` or, with Matryoshka options,
    ``sweeps.NestedSweeps``), the scale the backends read (already their 0-d scalar:
    ``clip_fast.core.checks.as_scalar_tensor``), the compute dtype and the call's
    :class:`FamilyTargets`.

    No bias: it shifts every logit equally, so it cancels from every softmax of this loss
    and is kept out of the arithmetic.
    """
    acc = compute_dtype(img.dtype)
    return make_sweeps(layout, scale, acc), scale, acc, FamilyTargets.of(layout)


def rowdot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """<a_i, b_i> for every row, accumulated in ``dtype``."""
    return (a.to(dtype) * b.to(dtype)).sum(dim=1)


@dataclass(frozen=True)
class FamilyTargets:
    """A distributed call's target options (``clip_fast.clip.targets``) with the global sizes
    they need: the softmaxes span every rank's rows and hard negatives, so
    K_r = N + M_t and K_c = N + M_i over the whole group."""
    lam: float          # image_to_text_weight
    eps: float          # label_smoothing
    has_ids: bool
    inv_k_row: float    # 1 / K_r
    inv_k_col: float    # 1 / K_c

    @classmethod
    def of(cls, layout: Layout) -> "FamilyTargets":
        t = layout.opts
        n = layout.n_global
        return cls(lam=t.image_to_text_weight, eps=t.label_smoothing, has_ids=layout.has_ids,
                   inv_k_row=1.0 / (n + layout.m_txt), inv_k_col=1.0 / (n + layout.m_img))

    @property
    def host(self) -> bool:
        """Whether Q has entries beyond the paired ones (groups or smoothing): host terms."""
        return self.has_ids or self.eps > 0.0

    def weights(self, n: int) -> Tuple[float, float]:
        """(a, b): the row and column weights of a loss averaged over n rows / columns."""
        return self.lam / n, (1.0 - self.lam) / n

    def block(self, x, y, a: float, b: float, acc: torch.dtype, **kw):
        """``clip_fast.clip.targets.block_targets`` of one block, in the compute dtype."""
        return block_targets(x.to(acc), y.to(acc), a=a, b=b, eps=self.eps, inv_k_row=self.inv_k_row,
                             inv_k_col=self.inv_k_col, **kw)

    def uniform(self, x, y, a: float, b: float, acc: torch.dtype):
        """A hard-negative block's targets (smoothing only): (qx, qy, t), or None without smoothing."""
        if not self.eps:
            return None
        return self.block(x, y, a, b, acc, positives=False, pair_offset=None)[:3]
