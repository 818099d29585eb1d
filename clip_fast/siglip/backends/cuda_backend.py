"""The CUDA C++ SigLIP backend: ``csrc/siglip.cu`` and ``csrc/siglip_op.cpp`` in ``clip_fast._C``.

Per block within the workspace budget: cuBLAS gives the float32 tile of img @ txt.T, one
CUDA kernel turns it into the loss terms, G and the float64 row sums (one CTA per row,
no atomics: deterministic), and cuBLAS adds G @ txt and G.T @ img.  The op is
``torch.ops.clip_fast_cuda.siglip_block`` (``TORCH_LIBRARY`` in C++); the fake below
lets torch.compile trace through it.  Devices and dtypes as the CLIP CUDA backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...clip.backends.cuda_backend import _C, unavailable_reason  # noqa: F401  (same build, same devices)
from ...core.numerics import siglip_block_meta

NAME = "cuda"


def siglip_block(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                 bias: Optional[torch.Tensor], ids_row: Optional[torch.Tensor],
                 ids_col: Optional[torch.Tensor], diag_positive: bool, need_grad: bool):
    return torch.ops.clip_fast_cuda.siglip_block(
        img, txt, scale, bias, ids_row, ids_col,
        bool(diag_positive), bool(need_grad))


if _C is not None:
    @torch.library.register_fake("clip_fast_cuda::siglip_block")
    def _siglip_block_fake(img, txt, scale, bias, ids_row, ids_col, diag_positive, need_grad):
        return siglip_block_meta(img, txt, need_grad)
