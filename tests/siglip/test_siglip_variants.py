"""The SigLIP kernel variants (kernels/config.py SIGLIP_VARIANTS) against the float64 reference.

The exactness tests of test_siglip.py run under a variant with CLIP_FAST_SIGLIP_VARIANT=<name>
(CI's variants leg); their shapes mostly have rows that are not 16-byte aligned (D = 1, 33, 129
in fp32), where "tma" and "tma_persistent" keep pointer loads (and one program per tile).  These
tests add what those cannot see: the variants on aligned rows (so the descriptor loads run) over
padded and whole tiles, in fp32 and bf16, with diagonal and group-id labels, the confident and
large-|S| cases, the persistent grid with 1-3 programs walking several tiles each, the fused
design against the workspace one, and the selection rules.
Runs in the Triton interpreter on CPU: bf16 through the kernels' DOT_UPCAST (the bf16 loads, the
epilogue and G's rounding to bf16, not the bf16 MMA instruction); the descriptor loads run with
their zero padding and the persistent loop over tiles, NOT the TMA instructions, their
shared-memory layout, the software pipelining across tiles (``flatten``) or the programs'
residency (aot_check compiles those for sm_90; benchmarks/gpu_check.sh runs them).
"""
import json
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_siglip as ts  # noqa: E402

from clip_fast.kernels import config as kconfig  # noqa: E402
from clip_fast.kernels import lse_forward as lf  # noqa: E402
from clip_fast.kernels import siglip as ksig  # noqa: E402

DEV = ts.DEV
VARIANTS = [v for v in kconfig.SIGLIP_VARIANTS if v != "default"]


def _tma_taken(x, dtype):
    feats = x.to(device=DEV, dtype=dtype)
    return lf.use_tma(kconfig.siglip_design(), feats, feats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,d,groups", [(37, 40, False), (64, 32, False), (45, 24, True)],
                         ids=["padded", "whole", "group-ids"])
def test_variant_exact(variant, n, d, groups, dtype):
    """Padded (37, 45 rows: tiles cut by the edge) and whole (64) tiles, rows of 16-byte
    multiples so that "tma" loads through descriptors, at scale 30 with a positive bias."""
    x, t = ts._features(n, d, seed=n + d, noise=0.7)
    ids = torch.randint(0, 6, (n,), generator=torch.Generator().manual_seed(n)) if groups else None
    with kconfig.siglip_variant_override(variant):
        assert _tma_taken(x, dtype) == kconfig.SIGLIP_VARIANTS[variant]["use_tma"]
        ts._check_once(x, t, 30.0, 2.0, dtype, "triton", ids=ids)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_confident_and_large_logits(variant):
    """test_siglip's confident pairs (|S| = 90, every term below fp32's normal range) and wrong
    pairs at |S| = 1e4, under the variant (their rows are 400 and 16 bytes: descriptors run)."""
    with kconfig.siglip_variant_override(variant):
        ts.test_confident_pairs_at_scale_100("triton")
        ts.test_large_logits_do_not_overflow("triton")


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_scale_100_bf16(variant):
    """bf16 at scale 100 with a negative bias: the materialised bf16 loss's error sets the bar."""
    x, t = ts._features(50, 48, seed=5, noise=0.5)
    with kconfig.siglip_variant_override(variant):
        ts._check_once(x, t, 100.0, -10.0, torch.bfloat16, "triton")


def _record_programs(monkeypatch):
    """The ``max_programs`` of every sweep launch (0: one program per tile)."""
    seen = []
    launch = ksig._launch_sweep

    def spy(*args):
        seen.append(args[-1])
        return launch(*args)

    monkeypatch.setattr(ksig, "_launch_sweep", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("programs", [1, 2, 3])
def test_tma_persistent_programs(programs, dtype, monkeypatch):
    """"tma_persistent" with 1-3 programs (the SM count forced): the workspace kept at 4096
    elements, so 77 x 77 splits into blocks starting at rows and columns 64 (the descriptors end
    at each block's last row and column), the first of 2 x 2 interpreter tiles, so a program
    walks several of a block's tiles, non-adjacent ones with 2 or 3 programs; group ids, padded
    tiles, against the float64 reference and the materialised loss."""
    monkeypatch.setattr(ksig, "_num_sms", lambda device: programs)
    monkeypatch.setenv("CLIP_FAST_WORKSPACE_MB", str(4096 * dtype.itemsize / 2**20))
    seen = _record_programs(monkeypatch)
    x, t = ts._features(77, 40, seed=programs, noise=0.7)
    ids = torch.randint(0, 9, (77,), generator=torch.Generator().manual_seed(programs))
    with kconfig.siglip_variant_override("tma_persistent"):
        assert _tma_taken(x, dtype)
        ts._check_once(x, t, 30.0, 2.0, dtype, "triton", ids=ids)
    assert seen and all(p == programs for p in seen)


@pytest.mark.parametrize("variant", ["tma", "tma_persistent"])
def test_tma_falls_back_on_unaligned_rows(variant, monkeypatch):
    """Rows of 33 fp32 features (132 bytes) are not 16-byte aligned: pointer loads, and one program
    per tile for "tma_persistent" (its persistent grid runs with the descriptor loads only)."""
    monkeypatch.setattr(ksig, "_num_sms", lambda device: 2)
    seen = _record_programs(monkeypatch)
    x, t = ts._features(37, 33, seed=4, noise=0.7)
    with kconfig.siglip_variant_override(variant):
        assert not _tma_taken(x, torch.float32)
        ts._check_once(x, t, 30.0, 2.0, torch.float32, "triton")
    assert seen == [0]


def test_fused_equals_workspace():
    """Both designs round G to the input dtype and accumulate its products in fp32: over 3 x 3
    tiles their gradients differ only by summation order, their row sums not at all."""
    import clip_fast

    x, t = ts._features(77, 40, seed=3)
    got = {}
    for variant in ("default", "fused_bwd"):
        xf = x.float().to(DEV).requires_grad_(True)
        tf = t.float().to(DEV).requires_grad_(True)
        sf = torch.tensor(10.0, device=DEV, requires_grad=True)
        bf = torch.tensor(-5.0, device=DEV, requires_grad=True)
        with kconfig.siglip_variant_override(variant):
            loss = clip_fast.siglip_loss(xf, tf, sf, bf, backend="triton")
        loss.backward()
        got[variant] = (loss.detach(), xf.grad, tf.grad, sf.grad, bf.grad)
    for what, a, b in zip(ts.NAMES, got["default"], got["fused_bwd"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * a.abs().max().item()), what


def test_siglip_variant_selection(monkeypatch, tmp_path):
    """CLIP_FAST_SIGLIP_VARIANT picks the variant; unknown names raise naming them; the winner
    file's "siglip" entry is read from a GPU run's file only, and checked (it is untrusted)."""
    monkeypatch.setenv("CLIP_FAST_SIGLIP_VARIANT", "fused_bwd")
    assert kconfig.siglip_design().fused_bwd and not kconfig.siglip_design().use_tma
    monkeypatch.setenv("CLIP_FAST_SIGLIP_VARIANT", "tma_persistent")
    design = kconfig.siglip_design()
    assert design.use_tma and design.persistent == 1 and not design.fused_bwd
    assert kconfig.SIGLIP_VARIANTS["tma"]["persistent"] == 0
    monkeypatch.setenv("CLIP_FAST_SIGLIP_VARIANT", "share_exp")   # a CLIP variant, not SigLIP's
    with pytest.raises(ValueError, match="share_exp"):
        kconfig.siglip_design()
    monkeypatch.delenv("CLIP_FAST_SIGLIP_VARIANT")
    with pytest.raises(ValueError, match="nope"):
        with kconfig.siglip_variant_override("nope"):
            pass
    path = tmp_path / "w.json"
    monkeypatch.setenv("CLIP_FAST_WINNER_FILE", str(path))
    path.write_text(json.dumps({"variant": "default", "siglip": {"variant": "tma"}}))
    assert kconfig._siglip_winner() == "tma"
    path.write_text(json.dumps({"variant": "default", "siglip": {"variant": "tma"}, "dry_run": True}))
    assert kconfig._siglip_winner() is None
    for bad in ({"variant": "x"}, ["tma"]):
        path.write_text(json.dumps({"variant": "default", "siglip": bad}))
        with pytest.raises(ValueError, match="siglip"):
            kconfig._siglip_winner()
    path.write_text(json.dumps({"variant": "default"}))
    assert kconfig._siglip_winner() is None
