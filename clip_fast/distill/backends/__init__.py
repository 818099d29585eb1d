"""The distillation term's backends: ``torch`` (any device) and ``triton`` (``clip_fast.kernels.distill``).

Both implement ``distill_forward`` and ``distill_backward`` on one block, the contract in
``clip_fast.distill.backends.torch_backend``; the four log-sum-exps they read come from the CLIP
backend of the same name (``lse_forward``).  Loaded and chosen by the one rule of
``clip_fast.core.registry.BackendFamily``; there is no CUDA-extension kernel.
"""
from __future__ import annotations

import torch

from ...core.registry import BackendFamily

DISTILL_BACKENDS = ("torch", "triton")

_DISTILL = BackendFamily("distillation ", {
    "torch": "clip_fast.distill.backends.torch_backend",
    "triton": "clip_fast.distill.backends.triton_backend",
})
preload = _DISTILL.preload
get_loaded = _DISTILL.get_loaded


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend name the distillation term runs on ("torch" or "triton").

    "auto" (or ``CLIP_FAST_BACKEND``) takes Triton for CUDA tensors where it can run and the
    torch backend otherwise; a backend named explicitly raises when it cannot run.
    """
    if name == "cuda":
        raise RuntimeError(
            "clip_fast's distillation loss has no CUDA-extension (backend='cuda') kernel; use "
            "backend='triton' (CUDA tensors) or backend='torch' (any device), or backend='auto'")
    if name != "auto" and name not in DISTILL_BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + DISTILL_BACKENDS}, got {name!r}")
    return _DISTILL.resolve(name, device, dtype).NAME
