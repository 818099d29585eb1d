"""The fused Triton backend: kernels in ``clip_fast.kernels`` (the repo's ``kernels/``).

``lse_forward`` is one sweep over the tiles of S giving row lse, column lse and the
diagonal; ``grad_backward`` recomputes each tile once for G and hands the two gradient
GEMMs to cuBLAS.  Both go through torch.library ops (``clip_fast::triton_lse_forward``
is a ``triton_op`` that torch.compile traces through; ``clip_fast::triton_grad_backward``
is an opaque ``custom_op`` because its block loop grows with N^2 / workspace).

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1,
used by CI).  float16, bfloat16 and float32; float64 is the torch backend's job.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import diag_coef_scalar, diag_grad, kernel_dtype_reason, kernel_lse, scale_grad_from_rows

NAME = "triton"

try:
    import triton  # noqa: F401
    _TRITON_ERROR: Optional[str] = None
except Exception as exc:  # not installed, or a broken install
    _TRITON_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"

if _TRITON_ERROR is None:
    from ...kernels import config as _config
    # Importing the kernel modules registers their ops, called below by name.
    from ...kernels import grad_backward as _grad_module, lse_forward as _lse_module  # noqa: F401
    from ...kernels.lse_forward import lse_forward_offdiag as _lse_forward_offdiag


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    reason = _TRITON_ERROR or kernel_dtype_reason(dtype, "Triton")
    if reason is not None:
        return reason
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if device.type == "cpu":
        if _config.interpreter_active():
            return None
        return "needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1, the Triton interpreter)"
    return f"device type {device.type!r} is not supported (CUDA tensors needed)"


def lse_forward(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.clip_fast.triton_lse_forward(img, txt, scale, bias)


def lse_forward_offdiag(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lse_forward`` before the diagonal is added back (eager only: not a torch.library op)."""
    return _lse_forward_offdiag(img, txt, scale, bias)


def grad_backward(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                  bias: Optional[torch.Tensor], lse_row: Optional[torch.Tensor],
                  lse_col: Optional[torch.Tensor], coef_row: float, coef_col: float,
                  coef_diag: float, diag: Optional[torch.Tensor] = None, split_scale: bool = False
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g_diag = None if diag is None else diag_grad(lse_row, lse_col, diag, coef_row, coef_col, coef_diag)
    lse_row, lse_col = kernel_lse(lse_row, coef_row), kernel_lse(lse_col, coef_col)
    d_img, d_txt, d_scale = torch.ops.clip_fast.triton_grad_backward(
        img, txt, scale, bias, lse_row, lse_col, float(coef_row), float(coef_col),
        diag_coef_scalar(coef_diag), g_diag, bool(split_scale))
    if not split_scale:
        d_scale = scale_grad_from_rows(d_img, img, d_txt, txt, coef_row, scale, d_scale)
    return d_img, d_txt, d_scale
