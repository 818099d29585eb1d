"""The distillation term's Triton backend: the kernels of ``clip_fast.kernels.distill``
(CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); contract in ``clip_fast.distill.backends.torch_backend``."""
from __future__ import annotations

from ...clip.backends.triton_backend import unavailable_reason  # noqa: F401  (same devices and dtypes)

NAME = "triton"

try:
    from ...kernels.distill import distill_backward, distill_forward  # noqa: F401
except Exception:  # triton missing: unavailable_reason (imported above) says why
    pass
