"""``clip_fast.clip.blocks`` on its own: the backends' off-diagonal sweep
(``lse_forward_offdiag``) against a materialised float64 log-sum-exp with the diagonal
masked, on square and rectangular odd shapes, and the loss's input checks.  The block loss
itself is checked against sentence-transformers' MNRL in ``tests/integrations``."""
from __future__ import annotations

import pytest
import torch

from helpers import backend_params
from clip_fast.clip import backends
from clip_fast.clip.blocks import Block, block_softmax_loss


def _reference(img, txt, scale):
    """float64 off-diagonal row and column log-sum-exp, materialised (no clip_fast code)."""
    s = scale * img.double() @ txt.double().T
    n = min(s.shape)
    s[torch.arange(n), torch.arange(n)] = float("-inf")
    return torch.logsumexp(s, 1), torch.logsumexp(s, 0)


@pytest.mark.parametrize("backend", backend_params(with_cuda=False))
@pytest.mark.parametrize("m,k", [(7, 7), (5, 13), (13, 5), (1, 4)])
def test_lse_forward_offdiag_matches_masked_reference(backend, m, k):
    """Off-diagonal lse within a few fp32 units of |S| (fp32 inputs, |S| < 200); the diagonal is S_ii; and
    ``lse_forward`` is the same sweep with the diagonal added back."""
    gen = torch.Generator().manual_seed(m * 31 + k)
    img, txt = torch.randn(m, 9, generator=gen), torch.randn(k, 9, generator=gen)
    impl = backends.resolve_backend(backend, img.device, img.dtype)
    scale = torch.tensor(20.0)
    row, col, diag = impl.lse_forward_offdiag(img, txt, scale)
    want_row, want_col = _reference(img, txt, 20.0)
    assert row.dtype == col.dtype == torch.float64
    fin_r, fin_c = torch.isfinite(want_row), torch.isfinite(want_col)
    assert torch.equal(fin_r, torch.isfinite(row)) and torch.equal(fin_c, torch.isfinite(col))
    assert torch.allclose(row[fin_r], want_row[fin_r], rtol=0, atol=2e-4)
    assert torch.allclose(col[fin_c], want_col[fin_c], rtol=0, atol=2e-4)
    n = min(m, k)
    want_diag = 20.0 * (img[:n].double() * txt[:n].double()).sum(1)
    assert torch.allclose(diag, want_diag, rtol=0, atol=2e-4)
    full_row = impl.lse_forward(img, txt, scale)[0]
    assert torch.allclose(full_row[:n], torch.logaddexp(row[:n], diag), rtol=0, atol=1e-12)


def test_block_loss_checks_its_inputs():
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    pos = Block(0, 1, 2.0, 2.0, 2.0, positive=True)
    with pytest.raises(ValueError, match=r"features\[1\] has shape \(5, 3\)"):
        block_softmax_loss([x, torch.randn(5, 3, dtype=torch.float64)], [pos], [1.0])
    with pytest.raises(ValueError, match=r"features\[1\] has shape \(5, 4\), torch.float32"):
        block_softmax_loss([x, y.float()], [pos], [1.0])
    with pytest.raises(ValueError, match="at most as many candidates"):
        block_softmax_loss([x, y[:3]], [pos], [1.0])
    with pytest.raises(ValueError, match="partition 0 needs exactly one positive block"):
        block_softmax_loss([x, y], [Block(0, 1, 2.0, None, 2.0)], [1.0])
