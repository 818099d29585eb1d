"""What every clip_fast ``autograd.Function`` returns from its forward."""
from __future__ import annotations

import torch


def fresh_output(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a new tensor of ``dtype``: never ``t`` itself, even when the dtype matches.

    A forward must not return a tensor object it also holds as an intermediate.
    ``torch.compile`` in torch 2.11 traces a Function's forward into a subgraph whose
    outputs are the real outputs followed by every intermediate tensor of the forward,
    and runs it as a new Function.  When the loss is ``t.to(dtype)`` with ``t`` already in
    ``dtype``, that call returns ``t`` itself, so the same object sits in two output slots;
    autograd wires it to the later (intermediate) slot, the traced backward reads the
    first one, and every gradient comes back as zeros.  A copy keeps the slots distinct;
    it costs one scalar.
    """
    return t.to(dtype, copy=True)

