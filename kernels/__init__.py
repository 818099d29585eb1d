"""Triton kernels for the CLIP contrastive loss (shipped as ``clip_fast.kernels``).

* ``lse_forward``   -- one sweep over the tiles of S = s * img @ txt.T + b giving the row
  log-sum-exp, the column log-sum-exp and the diagonal, nothing N x N written.
* ``grad_backward`` -- one recompute of each tile giving G = dloss/dS in a bounded
  workspace, reduced to d_scale in the kernel and to d_img, d_txt by cuBLAS.

Both are registered as torch.library ops (``clip_fast::triton_lse_forward``,
``clip_fast::triton_grad_backward``) so torch.compile keeps them in its graph.
"""
from .lse_forward import lse_forward
from .grad_backward import grad_backward

__all__ = ["lse_forward", "grad_backward"]
