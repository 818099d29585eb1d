"""``FastDistillClipLoss``: open_clip's ``DistillClipLoss`` without the N x N logits.

open_clip's distillation term, for student logits S and teacher logits T (both N x N,
``logits_per_text`` their transposes), is

    distill = (mean_i KL_row_i + mean_j KL_col_j) / 2,
    KL_row_i = -sum_j softmax(T_i.)_j log_softmax(S_i.)_j = lse_S(i) - sum_j PT_ij S_ij

and the same over columns.  Here, per block of S and T:

forward   ``lse_forward`` (the CLIP backend contract) on the student and on the teacher:
          the four float64 log-sum-exps, O(N) each.
          one sweep (``distill_forward``) for the cross terms
          ``sum_j PT_ij (lse_S(i) - S_ij)``, rows and columns together.
backward  one sweep (``distill_backward``) recomputes each tile of S and T once and gives
          the student's and, when it needs them, the teacher's gradients.
Nothing N x N is kept; the Function saves the inputs and six O(N) float64 vectors.
The contrastive part is ``clip_fast``'s CLIP loss (``FastClipLoss``), unchanged.

Distributed (gather mode, open_clip's semantics): the features are gathered exactly as
open_clip's ``gather_features`` gathers them (with or without grad, the own shard put
back when not ``local_loss``), so autograd routes every gradient as open_clip's does.
Without ``local_loss`` every rank computes the global term on one (N, N) block; with it,
rank r's image rows are the row direction of the block (img_r, all_txt) and its text
rows the column direction of the block (all_img, txt_r).

Backends: "torch" (``clip_fast.distill.backends.torch_backend``, any device) and "triton"
(``clip_fast.kernels.distill``, CUDA, or CPU under TRITON_INTERPRET=1).  There is no
CUDA-extension kernel for this loss: ``backend="cuda"`` raises and names the two that can.

Files, as for every loss: ``module`` (``FastDistillClipLoss``), ``functional``
(``distill_loss``), ``function`` (the autograd Function over one block), ``distributed``
(open_clip's gather semantics) and ``backends``.
"""
from .distributed import distributed_distill_loss, gather_like_open_clip
from .functional import distill_loss
from .module import FastDistillClipLoss

__all__ = ["FastDistillClipLoss", "distill_loss", "distributed_distill_loss", "gather_like_open_clip"]
