"""The fused Triton SigLIP backend: ``clip_fast.kernels.siglip`` (the repo's ``kernels/siglip.py``).

One sweep over the tiles of S gives the loss terms, G and the d_scale / d_bias row sums;
G goes through a bounded workspace to cuBLAS for d_img and d_txt.  The op is
``clip_fast::triton_siglip_block``, an opaque ``custom_op`` with a fake implementation,
so ``torch.compile(fullgraph=True)`` keeps it in the graph.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).
float16, bfloat16 and float32 (fp32 as tf32 when torch's matmul setting allows it).
"""
from __future__ import annotations

from typing import Optional

import torch

from ...clip.backends.triton_backend import unavailable_reason  # noqa: F401  (same devices and dtypes)

NAME = "triton"

try:
    from ...kernels import siglip as _kernels  # noqa: F401  (registers the op called below)
except Exception:  # triton missing: unavailable_reason (imported above) says why
    _kernels = None


def siglip_block(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                 bias: Optional[torch.Tensor], ids_row: Optional[torch.Tensor],
                 ids_col: Optional[torch.Tensor], diag_positive: bool, need_grad: bool):
    return torch.ops.clip_fast.triton_siglip_block(img, txt, scale, bias, ids_row, ids_col,
                                                   bool(diag_positive), bool(need_grad))


def nested_siglip_block(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                        bias: Optional[torch.Tensor], ids_row: Optional[torch.Tensor],
                        ids_col: Optional[torch.Tensor], diag_positive: bool, need_grad: bool, nested):
    """The Matryoshka sweep (``clip_fast.kernels.siglip.nested_siglip_block``): the size
    boundaries inside the K loop, one epilogue per size."""
    return _kernels.nested_siglip_block(img, txt, scale, bias, ids_row, ids_col, diag_positive, need_grad, nested)

