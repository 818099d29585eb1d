"""The kernel variants (kernels/config.py VARIANTS): each one against the float64 reference,
both sides of the per-tile exponent-sharing condition, and the variant selection.

The exactness tests of tests/clip/test_exactness.py run for every variant too (its
``kernel_variant`` fixture); these cover what those cannot see: which side of the sharing
condition a tile took, and the fused backward on odd shapes over several tiles.
Runs in the Triton interpreter on CPU (bf16 through the kernels' DOT_UPCAST, as in
test_triton.py: the bf16 loads, epilogue and G rounding, not the bf16 MMA instruction).
"""
import json
import math
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import features  # noqa: E402
from test_triton import INTERPRETER_CANNOT_LAUNCH, SMALL, _check_block  # noqa: E402

from clip_fast.kernels import config as kconfig  # noqa: E402
from clip_fast.kernels import lse_forward as lf  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(bool(INTERPRETER_CANNOT_LAUNCH), reason=str(INTERPRETER_CANNOT_LAUNCH))


@pytest.fixture(autouse=True)
def _small_blocks():
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    with kconfig.override(SMALL):
        yield
    torch.set_float32_matmul_precision(prev)


def _shared_forward_tiles(img, txt, scale, variant="share_exp"):
    """Run ``_check_block`` under ``variant``; return how many forward tiles shared one exp."""
    with kconfig.variant_override(variant), lf.count_shared_tiles(DEV) as count:
        _check_block(img, txt, scale=scale)
    return int(count.item())


def test_share_exp_taken_where_the_condition_holds():
    """fp32 at scale 100 with unit features: every |logit| is large, so the extra rounding of a
    shared argument is within the budget and tiles share; the results stay within the
    reference tolerance of the two-exp path."""
    x = features(40, 24, device=DEV)
    t = torch.nn.functional.normalize(x + 0.1 * features(40, 24, device=DEV), dim=1)
    assert _shared_forward_tiles(x, t, 100.0) > 0


def test_share_exp_refused_where_the_condition_fails():
    """fp32 at scale 1: the logits are ~1, so the column factors' arguments (~H2 = 100) would
    round 100x worse than S itself; no tile may share, and the answer is the two-exp one."""
    assert _shared_forward_tiles(features(40, 24, device=DEV), features(37, 24, device=DEV), 1.0) == 0


def test_share_exp_bf16_budget_is_the_dtype_unit():
    """The same scale-1 inputs in bf16: the materialised bf16 loss rounds its logits at 2^-8, so
    the budget (SHARE_KAPPA x 2^16 float32 units) admits the tiles."""
    x = features(40, 24, dtype=torch.bfloat16, device=DEV)
    assert _shared_forward_tiles(x, features(37, 24, dtype=torch.bfloat16, device=DEV), 1.0) > 0


def test_share_exp_wide_spread_falls_back():
    """Rows of very different norms: the tile spread exceeds the range bound (60 in log2)."""
    img = features(32, 16, device=DEV) * torch.linspace(0.1, 3.0, 32, device=DEV)[:, None]
    txt = features(32, 16, device=DEV) * torch.linspace(3.0, 0.1, 32, device=DEV)[:, None]
    n = _shared_forward_tiles(img, txt, 40.0)
    assert n < (32 // 16) * (32 // 16)


def _backward_share_mirror(lse_row, lse_col, bm, bn, budget):
    """The backward's per-tile sharing condition (kernels/grad_backward.shared_exp_g), restated
    in float64 on the host: for each tile, does it share?"""
    r2, c2 = lse_row.double() * lf.LOG2E, lse_col.double() * lf.LOG2E
    out = []
    for i in range(0, len(r2), bm):
        for j in range(0, len(c2), bn):
            v = torch.cat([r2[i:i + bm], c2[j:j + bn]])
            spread = (v.max() - v.min()).item()
            out.append(spread <= 60 and spread + 3 <= budget * max(1.0, v.abs().max().item()))
    return out


@pytest.mark.parametrize("scale,bias,expect", [(100.0, None, True), (1.0, -4.25, False)],
                         ids=["shares", "refuses"])
def test_backward_share_both_sides(scale, bias, expect):
    """The backward under share_exp on inputs whose tiles all share (scale 100: |lse| ~ 100 in
    log2) or some refuse (scale 1 with a bias putting the lse values around 0 and column
    norms spreading them by ~3: spread + 3 > SHARE_KAPPA x max|lse|), within the reference
    tolerance either way."""
    from reference import reference_block

    x = features(40, 24, device=DEV)
    t = torch.nn.functional.normalize(x + 0.3 * features(40, 24, device=DEV), dim=1)
    if scale == 1.0:
        t = t * torch.linspace(0.2, 6.0, 40, device=DEV)[:, None]
    r_row, r_col, _ = reference_block(x.cpu(), t.cpu(), scale, bias)
    decisions = _backward_share_mirror(r_row, r_col, SMALL.backward.BM, SMALL.backward.BN,
                                       lf.share_budget(torch.float32))
    assert all(decisions) if expect else not all(decisions)
    with kconfig.variant_override("share_exp"):
        _check_block(x, t, scale=scale, bias=bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["fused_bwd", "share_exp+fused_bwd"])
@pytest.mark.parametrize("m,k,d", [(37, 45, 33), (32, 48, 16)])
def test_fused_backward(variant, m, k, d, dtype):
    """The in-kernel backward (no G workspace) on padded and whole tiles, odd D (feature
    chunk masks), against float64 and the torch backend."""
    with kconfig.variant_override(variant):
        _check_block(features(m, d, dtype=dtype, device=DEV), features(k, d, dtype=dtype, device=DEV),
                     scale=20.0, bias=0.25)


def test_fused_backward_equals_workspace_backward():
    """Both designs round G to the input dtype the same way: their gradients differ only by
    fp32 summation order."""
    from clip_fast.clip.backends import triton_backend

    img, txt = features(37, 20, device=DEV), features(29, 20, device=DEV)
    sc = torch.tensor(30.0, device=DEV)
    lse_row, lse_col, _ = triton_backend.lse_forward(img, txt, sc, None)
    args = (img, txt, sc, None, lse_row.float(), lse_col.float(), 0.02, 0.03, 0.04)
    with kconfig.variant_override("default"):
        ws = triton_backend.grad_backward(*args)
    with kconfig.variant_override("fused_bwd"):
        fu = triton_backend.grad_backward(*args)
    for a, b in zip(ws, fu):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * a.abs().max().item())


def test_variant_selection(monkeypatch, tmp_path):
    """CLIP_FAST_VARIANT picks a variant; unknown names and malformed winner files raise,
    naming what they got."""
    monkeypatch.setenv("CLIP_FAST_VARIANT", "fused_bwd")
    assert kconfig.get_configs(torch.device("cpu")).backward_kind == "fused"
    monkeypatch.setenv("CLIP_FAST_VARIANT", "nope")
    with pytest.raises(ValueError, match="nope"):
        kconfig.get_configs(torch.device("cpu"))
    monkeypatch.delenv("CLIP_FAST_VARIANT")
    good = tmp_path / "w.json"
    good.write_text(json.dumps({"variant": "share_exp", "tile": [128, 128, 64, 8, 3]}))
    assert kconfig._read_winner(str(good))["variant"] == "share_exp"
    for bad in ({"variant": "x"}, {"variant": "default", "tile": [1, 2]}, [1]):
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="winner file"):
            kconfig._read_winner(str(p))
    assert kconfig._read_winner(str(tmp_path / "absent.json")) is None
    # A rehearsal's winner (CPU timings) is never used to configure a GPU.
    good.write_text(json.dumps({"variant": "share_exp", "tile": [64, 32, 32, 1, 1], "dry_run": True}))
    monkeypatch.setenv("CLIP_FAST_WINNER_FILE", str(good))
    assert kconfig._gpu_winner() is None and kconfig.winner_tile(9) is None
    assert math.isclose(lf.share_budget(torch.bfloat16), lf.SHARE_KAPPA * 2 ** 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k", [(37, 45), (32, 48)])
def test_tma_forward(m, k, dtype):
    """The forward through tensor descriptors (TMA loads when compiled for sm_90): the
    interpreter runs the descriptor loads themselves, with their zero padding of rows past M
    or K, on padded (37 x 45) and whole (32 x 48) tiles.  NOT covered on CPU: the TMA
    instructions and their shared-memory layout (aot_check compiles them; gpu_check runs them)."""
    img, txt = features(m, 32, dtype=dtype, device=DEV), features(k, 32, dtype=dtype, device=DEV)
    with kconfig.variant_override("tma"):
        assert lf.use_tma(kconfig.get_configs(DEV, dtype), img, txt)
        _check_block(img, txt, scale=30.0, bias=0.5)


@pytest.mark.parametrize("variant", ["tma", "tma_persistent"])
def test_tma_needs_aligned_rows(variant):
    """Rows of 33 fp32 features (132 bytes) are not 16-byte aligned: the sweeps keep pointer loads
    (and, for tma_persistent, one program per unit: the persistent grid runs with descriptors only)."""
    img = features(20, 33, device=DEV)
    with kconfig.variant_override(variant):
        assert not lf.use_tma(kconfig.get_configs(DEV, img.dtype), img, img)
        _check_block(img, features(21, 33, device=DEV), scale=30.0)


# ---- the persistent grid and its grouped order (kernels/tile.py grouped_tile) ----

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from clip_fast.kernels.tile import grouped_tile  # noqa: E402


@triton.jit
def _visit_kernel(count_ptr, order_ptr, num_pid_m, num_pid_n, num_programs, GROUP_M: tl.constexpr):
    """The forward's persistent loop with an empty body: each program walks the units with
    stride num_programs, maps each through ``grouped_tile``, counts the visit and records the
    unit's (pid_m, pid_n)."""
    for unit in tl.range(tl.program_id(0), num_pid_m * num_pid_n, num_programs):
        pid_m, pid_n = grouped_tile(unit, num_pid_m, num_pid_n, GROUP_M)
        tl.atomic_add(count_ptr + pid_m * num_pid_n + pid_n, 1)
        tl.store(order_ptr + 2 * unit, pid_m)
        tl.store(order_ptr + 2 * unit + 1, pid_n)


@pytest.mark.parametrize("num_pid_m,num_pid_n,group_m,programs",
                         [(5, 3, 2, 1), (5, 3, 2, 4), (7, 4, 8, 3), (16, 1, 8, 5), (3, 2, 8, 50), (9, 5, 4, 7)])
def test_persistent_grouped_order_visits_every_unit_once(num_pid_m, num_pid_n, group_m, programs):
    """``grouped_tile`` under the persistent loop is a bijection onto the (pid_m, pid_n) grid,
    whatever the grid size (fewer programs than units, more, one) and with a partial last
    group; consecutive units walk GROUP_M row blocks before moving to the next column."""
    n = num_pid_m * num_pid_n
    count = torch.zeros(n, dtype=torch.int32)
    order = torch.full((n, 2), -1, dtype=torch.int32)
    _visit_kernel[(min(programs, n),)](count, order, num_pid_m, num_pid_n, min(programs, n), GROUP_M=group_m)
    assert count.tolist() == [1] * n
    pm, pn = order[:, 0].tolist(), order[:, 1].tolist()
    assert all(0 <= a < num_pid_m for a in pm) and all(0 <= b < num_pid_n for b in pn)
    # Grouped: within the first group the row index runs fastest, over min(GROUP_M, rows) rows.
    g = min(group_m, num_pid_m)
    assert pm[:g] == list(range(g)) and pn[:g] == [0] * g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,programs,splits", [(37, 45, 2, 2), (32, 48, 3, 1), (37, 45, 1, 3)])
def test_tma_persistent(m, k, programs, splits, dtype, monkeypatch):
    """Both sweeps on a persistent grid through tensor descriptors (the ``tma_persistent``
    variant's switches at the interpreter's tile): the forward's ``programs`` programs walk
    row block x column split units (3 x ``splits`` here) in the grouped order, so a program
    sweeps several units, non-adjacent ones when programs > 1; the backward's walk the tiles
    of each workspace block, the workspace kept at 4 KiB so that blocks start at rows and
    columns > 0 (the descriptors end at each block's last row and column).  Padded (37 x 45) and
    whole (32 x 48) tiles, against float64 and the torch backend.  The interpreter runs the
    descriptor loads and the persistent loops; NOT covered on CPU: the TMA instructions, the
    software pipelining across tiles (``flatten``) and the residency of the programs
    (aot_check compiles the variant)."""
    monkeypatch.setenv("CLIP_FAST_WORKSPACE_MB", str(4096 / 2**20))
    img, txt = features(m, 32, dtype=dtype, device=DEV), features(k, 32, dtype=dtype, device=DEV)
    cfg = kconfig.Configs(forward=SMALL.forward, backward=SMALL.backward, col_splits=splits,
                          use_tma=True, backward_tma=True, persistent=programs)
    with kconfig.override(cfg):
        assert lf.use_tma(kconfig.get_configs(DEV, dtype), img, txt)
        _check_block(img, txt, scale=30.0, bias=0.5)


def test_tma_persistent_variant_switches():
    """The variant sets TMA and one persistent program per SM on top of the table."""
    cfg = kconfig.apply_variant(kconfig.table_configs(9), "tma_persistent")
    assert cfg.use_tma and cfg.backward_tma and cfg.persistent == 1 and cfg.backward_kind == "workspace"


def test_regs128_at_its_own_tile():
    """regs128 at its own 128 x 128 x 64 tile (two stages), padded: the arithmetic of the tile the
    variant runs at on sm_90.  The register cap itself (ptxas's maxnreg) is a compile option that
    the interpreter does not see: aot_check compiles it and the cost report shows its spills."""
    tile = kconfig.VARIANT_TILES["regs128"]
    cfg = kconfig.apply_variant(kconfig.Configs(forward=tile, backward=tile, col_splits=1), "regs128")
    assert cfg.maxnreg == 128 and lf.launch_options(cfg) == {"maxnreg": 128}
    with kconfig.override(cfg):
        _check_block(features(130, 40, device=DEV), features(140, 40, device=DEV), scale=30.0, bias=0.5)
