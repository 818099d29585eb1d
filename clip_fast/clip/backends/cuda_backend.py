"""The CUDA C++ backend: hand-written kernels in ``csrc/``, built as ``clip_fast._C``.

``lse_forward`` is one sweep over the tiles of S (WMMA tensor cores for fp16/bf16 and
tf32, exact FMA for float32 when TF32 is off; float32 follows torch's matmul setting,
``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision``, read in
C++ when the op runs) giving row lse, column lse and the
diagonal; ``grad_backward`` recomputes each tile once into a bounded G workspace and
hands the two gradient GEMMs to cuBLAS.  Both are torch custom ops
(``torch.ops.clip_fast_cuda.*``, defined in C++ with ``TORCH_LIBRARY``); their fake
implementations below let torch.compile trace through them without graph breaks.

The extension is optional: without it (no nvcc at install time, CLIP_FAST_BUILD_CUDA=0,
a CPU-only torch) this module still imports and ``unavailable_reason`` says why.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import (diag_coef_scalar, diag_grad, kernel_dtype_reason, kernel_lse,
               scale_grad_from_rows)

NAME = "cuda"

try:
    from ... import _C  # noqa: F401  (loading it registers torch.ops.clip_fast_cuda)
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = (
        f"the CUDA extension clip_fast._C is not available ({type(exc).__name__}: {exc}); "
        "reinstall with nvcc on PATH and a CUDA build of torch, e.g. "
        "CLIP_FAST_BUILD_CUDA=1 pip install -e . --no-build-isolation"
    )


def compiled_archs() -> List[Tuple[int, int, bool]]:
    """(major, minor, has_ptx) for every architecture the extension was built for."""
    if _C is None:
        return []
    out = []
    for tok in _C.compiled_archs().split("_"):
        ptx = tok.endswith("p")
        digits = tok.rstrip("pa")
        if len(digits) >= 2 and digits.isdigit():
            out.append((int(digits[:-1]), int(digits[-1]), ptx))
    return out


def _runs_on(cap: Tuple[int, int]) -> bool:
    """Whether the build holds code for a GPU of compute capability ``cap``.

    Machine code for sm_XY runs on X.Z for Z >= Y (same major); PTX runs on anything newer.
    """
    for major, minor, ptx in compiled_archs():
        if (major == cap[0] and minor <= cap[1]) or (ptx and (major, minor) <= cap):
            return True
    return False


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    reason = _IMPORT_ERROR or kernel_dtype_reason(dtype, "CUDA")
    if reason is not None:
        return reason
    device = torch.device(device)
    if device.type != "cuda":
        return f"needs CUDA tensors, got device {device}"
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(index)
    if cap < (8, 0):
        return f"needs compute capability 8.0 or newer (bf16/tf32 tensor cores), device {index} has {cap[0]}.{cap[1]}"
    if not _runs_on(cap):
        built = ", ".join(f"{a}.{b}{'+PTX' if p else ''}" for a, b, p in compiled_archs()) or "none"
        return (f"the extension was built for [{built}], not for this GPU's {cap[0]}.{cap[1]}; "
                f"rebuild with CLIP_FAST_CUDA_ARCHS=\"{cap[0]}.{cap[1]}\"")
    return None


def lse_forward(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.clip_fast_cuda.lse_forward(
        img, txt, scale, bias)


def grad_backward(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                  bias: Optional[torch.Tensor], lse_row: Optional[torch.Tensor],
                  lse_col: Optional[torch.Tensor], coef_row: float, coef_col: float,
                  coef_diag: float, diag: Optional[torch.Tensor] = None, split_scale: bool = False
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g_diag = None if diag is None else diag_grad(
        lse_row, lse_col, diag, coef_row, coef_col, coef_diag).float()
    if split_scale and coef_row:
        # The C++ op reduces one d_scale, so the split is two sweeps of the block: the row
        # term alone (a diagonal from g_diag zeroed: it belongs to the rest), then the rest.
        # It costs a second recompute of every tile; only the ring's off-diagonal blocks ask.
        k_row = kernel_lse(lse_row, coef_row)
        d_img, d_txt, ds_row = torch.ops.clip_fast_cuda.grad_backward(
            img, txt, scale, bias, k_row, None,
            float(coef_row), 0.0, 0.0, None if g_diag is None else torch.zeros_like(g_diag))
        # With g_diag the op reads coef_diag only for its workspace scaling, which must cover
        # the diagonal (it still carries the row term there).
        diag_scale = diag_coef_scalar(coef_diag)
        if g_diag is not None and g_diag.numel():
            diag_scale = max(abs(diag_scale), float(g_diag.abs().max()))
        if coef_col or diag_scale:
            di, dt, ds_rest = torch.ops.clip_fast_cuda.grad_backward(
                img, txt, scale, bias, None,
                kernel_lse(lse_col, coef_col), 0.0, float(coef_col), diag_scale, g_diag)
            d_img, d_txt = d_img.add_(di), d_txt.add_(dt)
        else:
            ds_rest = torch.zeros_like(ds_row)
        return d_img, d_txt, torch.stack([ds_row, ds_rest])
    lse_row, lse_col = kernel_lse(lse_row, coef_row), kernel_lse(lse_col, coef_col)
    d_img, d_txt, d_scale = torch.ops.clip_fast_cuda.grad_backward(
        img, txt, scale, bias, lse_row, lse_col,
        float(coef_row), float(coef_col), diag_coef_scalar(coef_diag), g_diag)
    if split_scale:  # no row term: all of d_scale is the rest
        return d_img, d_txt, torch.stack([torch.zeros_like(d_scale), d_scale])
    return d_img, d_txt, scale_grad_from_rows(d_img, img, d_txt, txt, coef_row, scale, d_scale)


# ---- fake (meta) implementations: shapes and dtypes only, for torch.compile / FakeTensor ----
if _C is not None:
    @torch.library.register_fake("clip_fast_cuda::lse_forward")
    def _lse_forward_fake(img, txt, scale, bias, allow_tf32=None):
        m, k = img.shape[0], txt.shape[0]
        return (img.new_empty((m,), dtype=torch.float64),
                img.new_empty((k,), dtype=torch.float64),
                img.new_empty((torch.sym_min(m, k),), dtype=torch.float64))

    @torch.library.register_fake("clip_fast_cuda::grad_backward")
    def _grad_backward_fake(img, txt, scale, bias, lse_row, lse_col, coef_row, coef_col,
                            coef_diag, g_diag=None, allow_tf32=None):
        return (img.new_empty(img.shape, dtype=torch.float32),
                txt.new_empty(txt.shape, dtype=torch.float32),
                img.new_empty((), dtype=torch.float32))
