"""Backends: the two tiled sweeps behind every clip_fast loss.

Every backend module (``torch_backend``, ``triton_backend``, ``cuda_backend``)
implements the same two functions on one *block* ``S = scale * img @ txt.T + bias``
of shape (M, K).  Nothing of size M x K is ever returned or kept.

``lse_forward(img, txt, scale, bias) -> (lse_row, lse_col, diag)``
    img: (M, D), txt: (K, D), same floating dtype and device, any strides.
    scale: 0-d float32 tensor on the same device (already exponentiated).
    bias: 0-d float32 tensor on the same device, or None.
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
    vector, one target weight per pair (``clip_fast.targets``).  ``diag``, the forward's diag, makes G's diagonal come from the
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

The symmetric CLIP loss on a square batch is one block with
``coef_row = coef_col = 1 / (2N)`` and ``coef_diag = 1 / N``.  The distributed
modes compose rectangular blocks from the same two functions.

Each backend module also defines ``unavailable_reason(device, dtype) -> str | None``
(None when it can run on that device and dtype), and ``NAME``.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, Optional, Tuple, Union

import torch

BACKENDS = ("torch", "triton", "cuda")
# The order in which ``backend="auto"`` tries backends on a CUDA device.  The CUDA
# extension is not auto-picked until a committed GPU measurement shows it faster
# than the Triton kernels (see benchmarks/results/).
AUTO_ORDER_CUDA = ("triton", "torch")


class BackendFamily:
    """The backend modules of one loss (CLIP's here; SigLIP's in ``backends.siglip``):
    lazy imports that remember why a backend failed, and the one backend-choice rule.

    ``auto`` (or ``CLIP_FAST_BACKEND``) tries ``AUTO_ORDER_CUDA`` on CUDA and the torch
    backend elsewhere, falling back quietly; a backend asked for by name raises when it
    cannot run.
    """

    def __init__(self, label: str, modules: Dict[str, str]):
        self.label = label            # "" for the CLIP loss, "SigLIP " for SigLIP, in messages
        self.modules = modules        # backend name -> module path
        self.loaded: Dict[str, ModuleType] = {}
        self.import_errors: Dict[str, str] = {}

    def load(self, name: str) -> Optional[ModuleType]:
        if name in self.loaded:
            return self.loaded[name]
        if name in self.import_errors:
            return None
        try:
            mod = importlib.import_module(self.modules[name])
        except Exception as exc:  # ImportError, or a broken Triton/extension install
            self.import_errors[name] = f"import failed: {type(exc).__name__}: {exc}"
            return None
        self.loaded[name] = mod
        return mod

    def preload(self, name: str = "auto") -> None:
        """Import backend ``name`` (all of them for "auto") now, outside any compiled region."""
        for cand in (BACKENDS if name == "auto" else (name,)):
            if cand in self.modules:
                self.load(cand)

    def unavailable_reason(self, name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """Why backend ``name`` cannot run on this device and dtype, or None if it can."""
        if name not in self.modules:
            return f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}"
        mod = self.load(name)
        if mod is None:
            return self.import_errors[name]
        return mod.unavailable_reason(torch.device(device), dtype)

    def resolve(self, name: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
        """The backend module for ``name`` ("auto" or a backend name)."""
        if name == "auto":
            forced = os.environ.get("CLIP_FAST_BACKEND", "").strip().lower()
            if forced and forced != "auto":
                name = forced
            else:
                order = AUTO_ORDER_CUDA if device.type == "cuda" else ("torch",)
                for cand in order:
                    if self.unavailable_reason(cand, device, dtype) is None:
                        return self.loaded[cand]
                return self.get_loaded("torch")
        reason = self.unavailable_reason(name, device, dtype)
        if reason is not None:
            raise RuntimeError(
                f"clip_fast {self.label}backend={name!r} cannot run on device={device} with "
                f"dtype={dtype}: {reason}")
        return self.loaded[name]

    def get_loaded(self, name: str) -> ModuleType:
        """The module of a backend that ``resolve`` already loaded."""
        mod = self.loaded.get(name) or self.load(name)
        if mod is None:
            raise RuntimeError(f"clip_fast {self.label}backend {name!r} failed to load: "
                               f"{self.import_errors.get(name)}")
        return mod


_CLIP = BackendFamily("", {
    "torch": "clip_fast.backends.torch_backend",
    "triton": "clip_fast.backends.triton_backend",
    "cuda": "clip_fast.backends.cuda_backend",
})


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype S is accumulated in: float64 for float64 features, float32 for every other."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_scalar(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``scale``/``bias`` as the detached 0-d tensor of ``dtype`` a backend reads (None stays None)."""
    if t is None:
        return None
    return t.detach().reshape(()).to(dtype)


def f32_scalar(t: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """``scale``/``bias`` as the 0-d float32 tensor on ``like``'s device the kernels read."""
    return None if t is None else compute_scalar(t, torch.float32).to(like.device)


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_dtype_reason(dtype: torch.dtype, label: str) -> Optional[str]:
    """Why the fused-kernel backend ``label`` cannot take ``dtype``, or None if it can."""
    if dtype in KERNEL_DTYPES:
        return None
    extra = " (use backend='torch' for float64)" if dtype == torch.float64 else ""
    return f"dtype {dtype} is not supported by the {label} backend, which takes {KERNEL_DTYPES}{extra}"


LOG2E = 1.4426950408889634


def kernel_lse(lse: Optional[torch.Tensor], coef: float) -> Optional[torch.Tensor]:
    """The lse a kernel backward reads: a (2, n) float32 float-float pair in log2 units.

    Row 0 is ``hi``, the float32 rounding of lse * log2(e) (taken in float64), row 1 is
    ``lo``, the float32 rounding of the rest.  A kernel forms P = 2^((S2 - hi) - lo): on a
    row whose largest entry carries almost all the mass, S2 - hi is exactly 0 and P
    keeps the tiny 2^-lo a materialised softmax gives, which one float32 lse would round
    away.  None when the coefficient switches the term off.
    """
    if lse is None or not coef:
        return None
    return torch.stack(split_float(lse.to(torch.float64) * LOG2E))


def split_float(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 ``x`` as float32 ``(hi, lo)`` with hi + lo = x to ~2^-48 (lo = 0 where x is not finite)."""
    hi = x.float()
    lo = torch.where(torch.isfinite(hi), x - hi.to(torch.float64), 0.0).float()
    return hi, lo


def diag_grad(lse_row: Optional[torch.Tensor], lse_col: Optional[torch.Tensor],
              diag: torch.Tensor, coef_row: float, coef_col: float,
              coef_diag: Union[float, torch.Tensor]) -> torch.Tensor:
    """G's diagonal, ``coef_row * P_row_ii + coef_col * P_col_ii - coef_diag``, in float64.

    Formed from the forward's float64 loss terms ``lse - diag`` as
    ``coef_row * expm1(diag - lse_row) + coef_col * expm1(diag - lse_col)
    + (coef_row + coef_col - coef_diag)``: for the CLIP loss the constant is 0 and the
    two expm1 terms are small and accurate on a confident row, where ``P_ii - 1`` in
    float32 would be pure rounding.  ``coef_diag`` may be a float64 vector (one target
    weight per row: positive groups and label smoothing, see ``clip_fast.targets``).
    """
    n = diag.shape[0]
    out = torch.full((n,), float(coef_row) + float(coef_col), dtype=torch.float64, device=diag.device)
    out -= coef_diag if isinstance(coef_diag, torch.Tensor) else float(coef_diag)
    d = diag.to(torch.float64)
    if coef_row:
        out += float(coef_row) * torch.expm1(d - lse_row[:n].to(torch.float64))
    if coef_col:
        out += float(coef_col) * torch.expm1(d - lse_col[:n].to(torch.float64))
    return out


def diag_coef_scalar(coef_diag: Union[float, torch.Tensor]) -> float:
    """``coef_diag`` as the float a kernel reads for its scaling: a per-row vector (which
    only ever comes with ``diag``, so G's diagonal is ``g_diag``) gives its largest |entry|."""
    if isinstance(coef_diag, torch.Tensor):
        return float(coef_diag.abs().max()) if coef_diag.numel() else 0.0
    return float(coef_diag)


def scale_grad_from_rows(d_img: torch.Tensor, img: torch.Tensor, d_txt: torch.Tensor, txt: torch.Tensor,
                         coef_row: float, scale: torch.Tensor, d_scale: torch.Tensor) -> torch.Tensor:
    """d_scale = sum_ij G_ij <img_i, txt_j> re-formed as sum_i <(G @ txt)_i, img_i> / scale
    from a kernel's ``d_img = scale * G @ txt`` (``d_scale``, the kernel's own sum, where
    scale is 0), or, for a column-only G (``coef_row`` 0), as sum_j <(G.T @ img)_j, txt_j>.

    Each row of a row-softmax G (each column of a column-softmax G) sums to about 0, so
    the per-entry sum cancels terms of size |raw|; contracting along that direction first
    keeps the cancellation inside the GEMM, as the materialised loss's autograd forms it,
    and is the more accurate in fp32 at large |S|.  Row dots in the gradient's dtype,
    summed in float64.
    """
    s = scale.detach().reshape(()).to(torch.float64)
    d, x = (d_img, img) if coef_row else (d_txt, txt)
    rows = (d * x.to(d.dtype)).sum(dim=1, dtype=torch.float64).sum()
    return torch.where(s != 0, rows / torch.where(s != 0, s, 1.0), d_scale.to(torch.float64)).to(d_scale.dtype)


def combine_diag(lse_off: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """float64 ``logaddexp(lse_off, diag)`` over the first len(diag) entries (see the contract)."""
    out = lse_off.to(torch.float64, copy=True)
    n = diag.shape[0]
    out[:n] = torch.logaddexp(out[:n], diag.to(torch.float64))
    return out


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
