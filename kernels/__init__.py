"""Triton kernels for the CLIP contrastive loss (shipped as ``clip_fast.kernels``).

* ``lse_forward``   -- one sweep over the tiles of S = s * img @ txt.T + b giving the row
  log-sum-exp, the column log-sum-exp and the diagonal, nothing N x N written.
* ``grad_backward`` -- one recompute of each tile giving G = dloss/dS in a bounded
  workspace, reduced to d_scale in the kernel and to d_img, d_txt by cuBLAS.

Both are registered as torch.library ops (``clip_fast::triton_lse_forward``,
``clip_fast::triton_grad_backward``) so torch.compile keeps them in its graph.

Modules (not re-exported as functions, so ``clip_fast.kernels.lse_forward`` stays the
module): ``lse_forward``, ``grad_backward``, ``fused_backward`` (the backward variant without a
G workspace), ``siglip``, ``distill``, ``nested`` (the Matryoshka sweeps: every prefix size in
one pass), ``tile`` and ``workspace`` (what the sweeps share), ``config`` (block sizes, the
variants and their selection, the ``AotVariant`` each kernel module declares as
``aot_variants``), ``aot_check``
(``python -m clip_fast.kernels.aot_check``: compile every variant of every kernel for
sm_80/sm_90, no GPU) and ``sass`` (its cost report).
"""
if __package__ == "kernels":
    # Imported as a top-level ``kernels`` because a source checkout's root is on sys.path. That
    # name belongs to the Hugging Face Hub's package, which transformers probes for by importing
    # it. With no ``__file__`` and no ``__version__`` this module reads as a PEP 420 namespace
    # shadow, which transformers counts as "not installed"; the kernels themselves load only
    # as ``clip_fast.kernels``.
    __file__ = None
    __all__: list = []
else:
    from . import config, grad_backward, lse_forward  # noqa: F401  (registers the torch.library ops)

    __all__ = ["config", "grad_backward", "lse_forward"]
