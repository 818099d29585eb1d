"""The backend registry: one ``BackendFamily`` per loss, one choice rule for all of them."""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, Optional

import torch

BACKENDS = ("torch", "triton", "cuda")
# The order in which ``backend="auto"`` tries backends on a CUDA device.  The CUDA
# extension is not auto-picked until a committed GPU measurement shows it faster
# than the Triton kernels (see benchmarks/results/).
AUTO_ORDER_CUDA = ("triton", "torch")


class BackendFamily:
    """The backend modules of one loss (CLIP's in ``clip_fast.clip.backends``, SigLIP's in
    ``clip_fast.siglip.backends``): lazy imports that remember why a backend failed, and
    the one backend-choice rule.

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


def chunk_kwargs(backend: str, chunk_size: Optional[int]) -> dict:
    """The chunk-size rule: ``chunk_size`` (rows per strip) reaches the torch backend only;
    the kernel backends pick their own tiles."""
    return {"chunk_size": chunk_size} if backend == "torch" and chunk_size is not None else {}
