"""The bounded workspace the backward kernels write G into, and its reduction.

The backward sweeps (CLIP's ``grad_backward``, SigLIP's block, distillation's) write G = dloss/dS
one R x C block at a time into a workspace of at most ``config.workspace_bytes()``, and reduce each
block to d_img and d_txt with two fp32-accumulating GEMMs. csrc/workspace.h reads the same budget.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from . import config as _config


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and fp32 output (inputs fp16/bf16/fp32)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)   # torch >= 2.8 on CUDA
        except (TypeError, RuntimeError, NotImplementedError):
            return torch.mm(a, b).float()
    # CPU (interpreter tests): upcast, exact for fp16/bf16 values.
    return torch.mm(a.float(), b.float())


def block_shape(M: int, K: int, itemsize: int, bm: int, bn: int) -> Tuple[int, int]:
    """Workspace block R x C: everything if it fits the budget, else as square as allowed."""
    budget = max(_config.workspace_bytes() // itemsize, bm * bn)
    if M * K <= budget:
        return M, K
    side = int(math.isqrt(budget))
    R = min(M, max(bm, side // bm * bm))
    C = min(K, max(bn, (budget // R) // bn * bn))
    if C == K:   # columns all fit: give the rest of the budget to rows
        R = min(M, max(bm, (budget // K) // bm * bm))
    return R, C
