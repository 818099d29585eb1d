"""Backends: the two tiled sweeps behind every clip_fast loss.

Every backend module (``torch_backend``, ``triton_backend``, ``cuda_backend``)
implements the same two functions on one *block* ``S = scale * img @ txt.T + bias``
of shape (M, K).  Nothing of size M x K is ever returned or kept.

``lse_forward(img, txt, scale, bias) -> (lse_row, lse_col, diag)``
    img: (M, D), txt: (K, D), same floating dtype and device, any strides.
    scale: 0-d float32 tensor on the same device (float64 for float64 inputs; already
           exponentiated), as ``clip_fast.core.checks.as_scalar_tensor`` makes it.
    bias: 0-d tensor like scale, or None.
    lse_row: (M,)  logsumexp_j S_ij
    lse_col: (K,)  logsumexp_i S_ij
    diag:    (min(M, K),)  S_ii
    All three are float64.  S is accumulated in float32 (float64 for float64 inputs)
    whatever the input dtype; the float64 outputs carry one guarantee beyond that:
    ``lse_row[i] - diag[i]`` and ``lse_col[i] - diag[i]`` (the per-pair loss terms) are
    accurate to the rounding of the loss term itself, not to the rounding of |S|.  A
    confident row at scale 100 has S_ii ~ 100 and lse_i - S_ii ~ 1e-9; in float32 that
    difference would be lost.  Every backend gets it the same way: the diagonal element
    is kept out of the row and column sums (which then only carry the off-diagonal mass,
    where fp32 rounding of S is harmless) and added back in float64,
    ``lse = logaddexp(lse_offdiag, S_ii)``.

``grad_backward(img, txt, scale, bias, lse_row, lse_col, coef_row, coef_col, coef_diag,
                diag=None, split_scale=False) -> (d_img, d_txt, d_scale)``
    With P_row = exp(S - lse_row[:, None]) and P_col = exp(S - lse_col[None, :]):
        G = coef_row * P_row + coef_col * P_col - coef_diag * I   (I: ones where i == j)
        d_img   = scale * G @ txt          (M, D)
        d_txt   = scale * G.T @ img        (K, D)
        d_scale = sum_ij G_ij * <img_i, txt_j>   (0-d)
    coef_* are Python floats; a zero coefficient switches its term off (its lse may
    then be None).  With ``diag`` given, ``coef_diag`` may also be a float64 (min(M, K),)
    vector, one target weight per pair (``clip_fast.clip.targets``).  ``diag``, the forward's diag, makes G's diagonal come from the
    forward's float64 loss terms (:func:`diag_grad`) instead of the recomputed tile:
    on a confident row G_ii = coef_row * (P_ii - 1) + ... cancels, and a recomputed S_ii
    that differs from the forward's by one fp32 rounding of |S| would leave an error of
    |S| * 2^-24 in it.  d_scale is reduced in float64.  Outputs are float32 (float64
    for float64 inputs).  The caller multiplies by the upstream gradient and casts to
    the input dtype.
    ``split_scale=True`` returns d_scale as a (2,) tensor instead: [sum_ij coef_row *
    P_row_ij * <img_i, txt_j> over every entry but a diagonal taken from ``diag``, the
    rest (the column term, the diagonal)]; its sum is the 0-d d_scale.  The ring's
    off-diagonal blocks need it: their rows belong to one rank's loss and their columns
    to another's, and each rank's d_logit_scale is the gradient of its own loss.

``lse_forward_offdiag(img, txt, scale, bias) -> (lse_row_off, lse_col_off, diag)``
    Optional (torch and Triton have it; ``clip_fast.clip.blocks`` needs it for a masked or
    differently scaled diagonal): ``lse_forward`` before the diagonal is added back, the
    log-sum-exp of the off-diagonal entries only (-inf where there are none).

The symmetric CLIP loss on a square batch is one block with
``coef_row = coef_col = 1 / (2N)`` and ``coef_diag = 1 / N``.  The distributed
modes compose rectangular blocks from the same two functions.

Each backend module also defines ``unavailable_reason(device, dtype) -> str | None``
(None when it can run on that device and dtype), and ``NAME``.
"""
from __future__ import annotations

from types import ModuleType
from typing import Dict, Optional

import torch

# The registry and the numerics helpers live in the core (``clip_fast.core``); they are
# re-exported here because every backend module reads them as ``from . import ...``.
from ...core.numerics import (KERNEL_DTYPES, LOG2E, combine_diag, compute_dtype,  # noqa: F401
                             compute_scalar, diag_coef_scalar, diag_grad,
                             kernel_dtype_reason, kernel_lse, scale_grad_from_rows, split_float)
from ...core.registry import AUTO_ORDER_CUDA, BACKENDS, BackendFamily  # noqa: F401

_CLIP = BackendFamily("", {
    "torch": "clip_fast.clip.backends.torch_backend",
    "triton": "clip_fast.clip.backends.triton_backend",
    "cuda": "clip_fast.clip.backends.cuda_backend",
})


def preload(name: str = "auto") -> None:
    """Import backend ``name`` (all of them for "auto") now, outside any compiled region.

    Backends are imported lazily; ``torch.compile(fullgraph=True)`` cannot trace an import,
    so ``FastClipLoss`` preloads in its constructor. Users of the functional form who compile
    it call this (or ``available_backends()``) once first.
    """
    _CLIP.preload(name)


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why backend ``name`` cannot run on this device and dtype, or None if it can."""
    return _CLIP.unavailable_reason(name, device, dtype)


def available_backends(device: str | torch.device | None = None,
                       dtype: torch.dtype = torch.float32) -> Dict[str, Optional[str]]:
    """Report each backend as ``{name: None}`` when usable, else ``{name: reason}``.

    ``device`` defaults to the current CUDA device when there is one, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {name: unavailable_reason(name, device, dtype) for name in BACKENDS}


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """Pick the backend module for ``name`` ("auto" or a backend name).

    ``auto`` falls back quietly; a backend asked for by name raises when it cannot run.
    The environment variable ``CLIP_FAST_BACKEND`` replaces ``auto``'s choice.
    """
    return _CLIP.resolve(name, device, dtype)


def get_loaded(name: str) -> ModuleType:
    """The module of a backend that ``resolve_backend`` already loaded."""
    return _CLIP.get_loaded(name)


def nested_ops(name: str):
    """``(nested_lse_forward, nested_grad_backward)`` of backend ``name``: the nested
    (Matryoshka) sweeps of one (M, K) block, every prefix size in one pass over D (the
    single-process loss sweeps the square block, the distributed modes rectangular ones).

    "torch": ``nested_torch`` (any device, float32/float64 compute).  "triton":
    ``clip_fast.kernels.nested`` (CUDA, or CPU under TRITON_INTERPRET=1); its functions take
    the GEMM operands in fp16/bf16/fp32/fp64, so a caller may hand them the input dtype's
    features (fp16/bf16 tensor cores) instead of the compute dtype's.  Both follow the contract
    in ``nested_torch``'s docs.  "cuda" has no nested sweep: a ValueError says so.
    """
    if name == "torch":
        from .nested_torch import nested_grad_backward, nested_lse_forward
    elif name == "triton":
        from ...kernels.nested import nested_grad_backward, nested_lse_forward
    elif name == "cuda":
        raise ValueError("matryoshka_dims has no backend='cuda' form (the nested sweep runs on the Triton "
                         "and torch backends): use backend='triton' or backend='torch'")
    else:
        raise ValueError(f"nested_ops: unknown backend {name!r} (expected 'torch' or 'triton')")
    return nested_lse_forward, nested_grad_backward
