"""The fused Triton backend against the float64 reference and the torch backend.

Without CUDA these run in the Triton CPU interpreter (TRITON_INTERPRET=1 is set here
before the kernels are imported), with small test-only blocks (16 x 16 x 16) so odd
shapes span several tiles and the whole file stays within a few minutes on 2 cores.

bf16 under the interpreter: its tl.dot on bf16 returns garbage, so the kernels take a
constexpr DOT_UPCAST that converts the bf16 tiles to fp32 just before tl.dot (set only
under the interpreter).  bf16 values are exact in fp32 and so are bf16 x bf16
products, so this computes the same sums as the bf16 MMA up to summation order.
COVERED for bf16 here: the bf16 loads (pointers, strides, masks, padding with 0), the
fp32 epilogue (exp2, online max, shared shift, atomics, diagonal), the casts of G into
the bf16 workspace and the cuBLAS-side GEMMs (CPU matmul here).  NOT covered here: the
bf16 MMA instruction itself (tensor-core tl.dot) and the GPU block configurations --
the `gpu` tests below cover those; benchmarks/gpu_check.sh runs them on a real GPU.
"""
import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from helpers import features  # noqa: E402
from reference import (  # noqa: E402
    reference_block, reference_block_grads, reference_block_magnitudes, reference_block_scale_split,
    reference_clip_loss)

from clip_fast.clip.backends import torch_backend, triton_backend  # noqa: E402
from clip_fast.kernels import config as kconfig  # noqa: E402
from clip_fast.kernels.lse_forward import (  # noqa: E402
    COL_UNDERFLOW, LOG2E, _lse_forward_kernel, column_bounds_log2, headroom_log2)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu" and "Interpreted" not in type(_lse_forward_kernel).__name__:
    pytest.skip("Triton kernels were imported before TRITON_INTERPRET=1 was set; run this file "
                "with TRITON_INTERPRET=1 on a machine without CUDA", allow_module_level=True)

# Triton before 3.7 turns the forward's loop bounds into ints with int() of a 1-element numpy
# array, which numpy 2.4 refuses (TypeError): its interpreter cannot launch the kernels there.
_TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])
_NUMPY_VERSION = tuple(int(x) for x in np.__version__.split(".")[:2])
INTERPRETER_CANNOT_LAUNCH = (
    f"Triton {triton.__version__}'s interpreter cannot run the forward's column loop with numpy "
    f"{np.__version__} (needs triton >= 3.7 or numpy < 2.4)"
    if DEV.type == "cpu" and _TRITON_VERSION < (3, 7) and _NUMPY_VERSION >= (2, 4) else None)
# The tests that launch no kernel: they run whatever the interpreter can do.
_NO_LAUNCH = {"test_unavailable_reasons", "test_backward_op_fake_impl",
              "test_kernels_compile_for_sm90_without_gpu"}

SMALL = kconfig.Configs(forward=kconfig.KernelConfig(16, 16, 16, 4, 2),
                        backward=kconfig.KernelConfig(16, 16, 16, 4, 2), col_splits=1)
# Worst-case rounding unit of the values each output is built from (see _check_block).
EPS = {torch.float32: 2.0 ** -20, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.fixture(autouse=True)
def _interpreter_can_launch(request):
    if INTERPRETER_CANNOT_LAUNCH and request.node.originalname not in _NO_LAUNCH:
        pytest.skip(INTERPRETER_CANNOT_LAUNCH)


@pytest.fixture(autouse=True)
def _small_blocks():
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")   # exact fp32 dots ("ieee")
    with kconfig.override(SMALL):
        yield
    torch.set_float32_matmul_precision(prev)


def _close(got, ref, tol, what):
    err = (got.double().cpu() - ref.double().cpu()).abs().max().item()
    assert math.isfinite(err) and err <= tol, f"{what}: max error {err:.3e} > tolerance {tol:.3e}"


def column_fallback_flags(img, txt, scale, bias=None) -> torch.Tensor:
    """Which columns the sweep hands to the exact fallback, from float64 logits and the kernels'
    own bounds: the whole shifted column sum below the flag (docs/numerics.md, section 3)."""
    c2 = column_bounds_log2(img, txt, scale, bias).double()
    s2 = (scale.to(torch.float64) * (img.double() @ txt.double().T)
          + (0.0 if bias is None else bias.double())) * LOG2E
    return torch.exp2(s2 - c2 + headroom_log2(img.shape[0])).sum(dim=0) < COL_UNDERFLOW


def _check_block(img, txt, scale, bias=None, coefs=None):
    """Triton forward + backward on one block vs float64 and vs the torch backend.

    Forward: S is accumulated in fp32 from the (exactly converted) inputs, so the lse and
    diagonal errors are fp32-sized relative to max|S|.  Backward: G is rounded once into
    the input dtype (workspace) and summed in fp32, so each gradient's error is bounded by
    a few units of that dtype times the sum of the absolute terms (_magnitudes).
    """
    m, k = img.shape[0], txt.shape[0]
    coefs = coefs or (1.0 / (2 * m), 1.0 / (2 * m), 1.0 / m)
    sc = torch.tensor(float(scale), device=img.device)
    bi = None if bias is None else torch.tensor(float(bias), device=img.device)
    lse_row, lse_col, diag = triton_backend.lse_forward(img, txt, sc, bi)
    assert lse_row.shape == (m,) and lse_col.shape == (k,) and diag.shape == (min(m, k),)
    assert lse_row.dtype == lse_col.dtype == diag.dtype == torch.float64
    r_row, r_col, r_diag = reference_block(img.cpu(), txt.cpu(), scale, bias)
    mag_s, mag_img, mag_txt, mag_sc = reference_block_magnitudes(img, txt, scale, bias, *coefs)
    ftol = 2e-6 * mag_s * max(1.0, math.sqrt(img.shape[1]) / 4)
    _close(lse_row, r_row, ftol, "lse_row")
    _close(lse_col, r_col, ftol, "lse_col")
    _close(diag, r_diag, ftol, "diag")

    d_img, d_txt, d_scale = triton_backend.grad_backward(img, txt, sc, bi, r_row.float().to(img.device),
                                                         r_col.float().to(img.device), *coefs)
    assert d_img.dtype == d_txt.dtype == d_scale.dtype == torch.float32
    assert d_img.shape == img.shape and d_txt.shape == txt.shape and d_scale.shape == ()
    g_img, g_txt, g_scale = reference_block_grads(img.cpu(), txt.cpu(), scale, bias, *coefs)
    # G's entries carry the dtype's rounding plus fp32's relative error of exp(S - lse),
    # which grows with |S| (2^-24 * max|S| per rounding of S and of the lse).
    eps = EPS[img.dtype] + 2.0 ** -22 * mag_s
    _close(d_img, g_img, 4 * eps * mag_img, "d_img")
    _close(d_txt, g_txt, 4 * eps * mag_txt, "d_txt")
    _close(d_scale, g_scale, 4 * eps * mag_sc, "d_scale")

    # Same contract as the torch backend (its own fp32 rounding, so a looser tolerance).
    t_row, t_col, t_diag = torch_backend.lse_forward(img, txt, sc, bi)
    _close(lse_row, t_row, 2 * ftol, "lse_row vs torch backend")
    _close(lse_col, t_col, 2 * ftol, "lse_col vs torch backend")
    t_img, t_txt, t_sc = torch_backend.grad_backward(img, txt, sc, bi, r_row.float().to(img.device),
                                                     r_col.float().to(img.device), *coefs)
    _close(d_img, t_img, 8 * eps * mag_img, "d_img vs torch backend")
    _close(d_txt, t_txt, 8 * eps * mag_txt, "d_txt vs torch backend")


@pytest.mark.parametrize("m,k,with_diag,coefs", [(37, 21, False, (0.03, 0.05, 0.0)),
                                                 (20, 33, True, (0.05, 0.02, 0.07)),
                                                 (18, 18, False, (0.0, 0.05, 0.05))])
def test_split_scale(m, k, with_diag, coefs):
    """split_scale: d_scale as [row term off a diag-given diagonal, the rest] over several tiles;
    the feature gradients and the total are those of the unsplit call."""
    img, txt = features(m, 19, device=DEV), features(k, 19, device=DEV)
    sc = torch.tensor(9.0, device=DEV)
    lse_row, lse_col, diag = triton_backend.lse_forward(img, txt, sc)
    kw = dict(diag=diag) if with_diag else {}
    whole = triton_backend.grad_backward(img, txt, sc, None, lse_row, lse_col, *coefs, **kw)
    split = triton_backend.grad_backward(img, txt, sc, None, lse_row, lse_col, *coefs, split_scale=True, **kw)
    assert split[2].shape == (2,) and split[2].dtype == torch.float32
    _close(split[0], whole[0], 0.0, "d_img")
    _close(split[1], whole[1], 0.0, "d_txt")
    mag = reference_block_magnitudes(img, txt, 9.0, None, *coefs)[3]
    _close(split[2].sum(), whole[2], 1e-6 * mag, "d_scale total")
    want = reference_block_scale_split(img.cpu(), txt.cpu(), 9.0, None, *coefs, with_diag)
    _close(split[2], want, 1e-5 * mag, "split d_scale")


@pytest.mark.parametrize("m,k,d", [(1, 1, 1), (2, 2, 33), (77, 77, 33), (77, 77, 1),
                                   (40, 77, 129), (77, 40, 16), (300, 300, 129)])
def test_shapes_fp32(m, k, d):
    _check_block(features(m, d, device=DEV), features(k, d, device=DEV), scale=14.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,d", [(77, 77, 33), (50, 33, 129)])
def test_low_precision(dtype, m, k, d):
    """fp16 and bf16 (bf16 via DOT_UPCAST under the interpreter, see the module doc)."""
    _check_block(features(m, d, dtype, device=DEV), features(k, d, dtype, device=DEV), scale=30.0, bias=-1.5)


@pytest.mark.parametrize("scale,bias", [(100.0, None), (100.0, 2.5), (0.5, -10.0)])
def test_scale_and_bias(scale, bias):
    _check_block(features(77, 33, device=DEV), features(77, 33, device=DEV), scale, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs(dtype):
    """Non-contiguous img (every other column) and txt (a transposed view)."""
    img = features(77, 66, dtype, device=DEV)[:, ::2]
    txt = torch.empty(33, 77, dtype=dtype, device=DEV).T  # (77, 33) with strides (1, 77)
    txt.copy_(features(77, 33, dtype, device=DEV))
    assert not img.is_contiguous() and not txt.is_contiguous()
    _check_block(img, txt, scale=50.0, bias=0.3)


def test_near_one_hot_rows_scale_100():
    """Confident rows: S_ii ~ 100 dominates each row and column (P ~ one-hot)."""
    img = features(77, 33, device=DEV)
    txt = torch.nn.functional.normalize(img + 0.01 * torch.randn_like(img), dim=1)
    _check_block(img, txt, scale=100.0)


def test_identical_embeddings():
    """All rows equal: every softmax is uniform, G = (1/N^2) - I/N exactly."""
    img = features(1, 33, device=DEV).expand(77, 33)
    txt = features(1, 33, device=DEV).expand(77, 33)
    _check_block(img, txt, scale=100.0)


def test_zero_vectors():
    """S = bias everywhere: lse = bias + ln N, and the bounds c_j collapse to the bias."""
    img = torch.zeros(40, 33, device=DEV)
    txt = torch.zeros(50, 33, device=DEV)
    _check_block(img, txt, scale=100.0, bias=1.0)


def test_column_underflow_fallback_single():
    """N = 1, img = -txt, s = 100: S = -100 against the bound +100; the column sum underflows."""
    img = features(1, 8, device=DEV)
    txt = -img
    sc = torch.tensor(100.0, device=DEV)
    assert column_fallback_flags(img.cpu(), txt.cpu(), sc.cpu()).all()
    _check_block(img, txt, scale=100.0)


def test_column_underflow_fallback_mixed():
    """Some columns far below their Cauchy-Schwarz bound (flagged), some not, across blocks.

    A flagged column's shifted sum is ~2^-800: without the exact fallback its lse would be
    -inf, so matching the reference proves the fallback ran (and left the others alone).
    """
    u = torch.nn.functional.normalize(torch.randn(1, 24, dtype=torch.float64), dim=1)
    img = torch.nn.functional.normalize(u + 0.05 * torch.randn(40, 24, dtype=torch.float64), dim=1)
    sign = torch.where(torch.arange(50) % 3 == 0, -3.0, 1.0).to(torch.float64)
    txt = sign[:, None] * torch.nn.functional.normalize(u + 0.05 * torch.randn(50, 24, dtype=torch.float64), dim=1)
    img, txt = img.float().to(DEV), txt.float().to(DEV)
    flags = column_fallback_flags(img.cpu(), txt.cpu(), torch.tensor(100.0))
    assert flags.any() and not flags.all()
    _check_block(img, txt, scale=100.0, coefs=(0.01, 0.02, 0.03))


@pytest.mark.parametrize("share_exp", [True, False])
@pytest.mark.parametrize("col_splits", [1, 3])
@pytest.mark.parametrize("m,k", [(77, 70), (64, 48)])
def test_exp_sharing_and_column_splits(share_exp, col_splits, m, k):
    """Both exponential paths (shared / two exps), the split column sweep, and padded
    (77 x 70) as well as whole-block (64 x 48: EVEN_MK, masks compiled out) tiles agree."""
    cfg = kconfig.Configs(forward=SMALL.forward, backward=SMALL.backward,
                          col_splits=col_splits, share_exp=share_exp)
    with kconfig.override(cfg):
        _check_block(features(m, 33, device=DEV), features(k, 33, device=DEV), scale=100.0, bias=0.5)


def test_wide_lse_spread_takes_two_exp_path():
    """Rows of very different norms: lse spread > 60 (log2) forces the per-tile fallback."""
    img = features(64, 16, device=DEV) * torch.linspace(0.1, 3.0, 64, device=DEV)[:, None]
    txt = features(64, 16, device=DEV) * torch.linspace(3.0, 0.1, 64, device=DEV)[:, None]
    with kconfig.override(kconfig.Configs(forward=SMALL.forward, backward=SMALL.backward,
                                          col_splits=1, share_exp=True)):
        _check_block(img, txt, scale=40.0)


@pytest.mark.parametrize("coefs", [(0.3, 0.0, 0.0), (0.0, 0.2, 0.0), (0.1, 0.2, 0.0), (0.0, 0.0, 0.5)])
def test_single_terms_of_g(coefs):
    """Each term of G on its own (a zero coefficient switches its term off)."""
    _check_block(features(33, 17, device=DEV), features(45, 17, device=DEV), scale=10.0, coefs=coefs)


def test_backward_workspace_blocks(monkeypatch):
    """A tiny workspace budget splits the backward into many row x column blocks."""
    monkeypatch.setenv("CLIP_FAST_WORKSPACE_MB", str(20 * 30 * 4 / 2**20))
    _check_block(features(77, 33, device=DEV), features(65, 33, device=DEV), scale=20.0)


def test_full_loss_through_function():
    """clip_loss(backend='triton'): loss and every gradient vs the float64 reference."""
    from clip_fast import clip_loss

    img = features(77, 33, device=DEV).requires_grad_(True)
    txt = features(77, 33, device=DEV).requires_grad_(True)
    scale = torch.tensor(30.0, device=DEV, requires_grad=True)
    loss = clip_loss(img, txt, scale, backend="triton")
    loss.backward()
    r_loss, r_img, r_txt, r_scale, _ = reference_clip_loss(img.cpu(), txt.cpu(), 30.0)
    _close(loss, r_loss, 1e-5, "loss")
    mags = reference_block_magnitudes(img.detach(), txt.detach(), 30.0, None, 1 / 154, 1 / 154, 1 / 77)
    _close(img.grad, r_img, 4 * EPS[torch.float32] * mags[1], "d_img")
    _close(txt.grad, r_txt, 4 * EPS[torch.float32] * mags[2], "d_txt")
    _close(scale.grad, r_scale, 1e-5 * mags[3] + 1e-6, "d_scale")


def test_autocast():
    """Under autocast the Function hands the kernels bf16 features; the loss is float32."""
    from clip_fast import clip_loss

    img = features(50, 33, device=DEV).requires_grad_(True)
    txt = features(50, 33, device=DEV)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        loss = clip_loss(img, txt, torch.tensor(20.0, device=DEV), backend="triton")
    loss.backward()
    assert loss.dtype == torch.float32 and img.grad.dtype == torch.float32
    r_loss, r_img, _, _, _ = reference_clip_loss(img.detach().bfloat16().cpu(), txt.bfloat16().cpu(), 20.0)
    _close(loss, r_loss, 1e-4, "loss")
    _close(img.grad, r_img, 4 * EPS[torch.bfloat16] * r_img.abs().max().item() * 4, "d_img")


def test_unavailable_reasons():
    assert "float64" in triton_backend.unavailable_reason(DEV, torch.float64)
    assert triton_backend.unavailable_reason(DEV, torch.bfloat16) is None
    assert "CUDA" in triton_backend.unavailable_reason(torch.device("meta"), torch.float32)


def test_backward_op_fake_impl():
    """The backward custom_op's fake (meta) implementation gives the right shapes/dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        img, txt = torch.empty(9, 5, dtype=torch.bfloat16), torch.empty(7, 5, dtype=torch.bfloat16)
        s, r, c = torch.empty(()), torch.empty(9), torch.empty(7)
        gi, gt, gs = torch.ops.clip_fast.triton_grad_backward(img, txt, s, None, r, c, 0.1, 0.1, 0.2)
    assert (gi.shape, gt.shape, gs.shape) == ((9, 5), (7, 5), ())
    assert gi.dtype == gt.dtype == gs.dtype == torch.float32


def test_torch_compile_module_fullgraph():
    """torch.compile(FastClipLoss(backend='triton')) captures both ops: no graph break.

    (On CPU the forward op is an opaque custom_op; on GPU it is a triton_op -- see
    test_gpu_forward_op_compiles_fullgraph and test_gpu_torch_compile_module.)
    """
    from clip_fast import FastClipLoss, backends

    # The Triton backend can run here; FastClipLoss's constructor imports it, outside the
    # compiled region (an import inside it would be a graph break).
    assert backends.unavailable_reason("triton", DEV, torch.float32) is None
    img, txt = features(40, 16, device=DEV), features(40, 16, device=DEV)
    mod = torch.compile(FastClipLoss(backend="triton"), backend="aot_eager", fullgraph=True)
    a = img.clone().requires_grad_(True)
    loss = mod(a, txt, torch.tensor(9.0, device=DEV))
    loss.backward()
    ref = reference_clip_loss(img.cpu(), txt.cpu(), 9.0)
    _close(loss, ref[0], 1e-5, "loss")
    _close(a.grad, ref[1], 1e-5, "d_img")


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_gpu():
    """Compiled mode (not the interpreter): every kernel variant of every loss compiles for
    sm_90; the CLIP and distillation kernels without spills (SigLIP's 64 x 128 tile spills a
    little, see ``kernels.siglip.tile_config``; the ``regs128`` variant's register cap spills by
    design, its cost is in the cost report; the nested (Matryoshka) backward tile keeps one
    size's H beside the running sum and may spill at most 128 B, ``kernels/nested.py``).

    Runs `python -m clip_fast.kernels.aot_check` in a subprocess without TRITON_INTERPRET:
    Triton's real compiler down to PTX plus ptxas, for an explicit target, no GPU needed.
    """
    import re

    from helpers import aot_check_report

    rc, report = aot_check_report("--arch", "90", "--dtype", "bf16")
    if "ptxas not found" in report:
        pytest.skip("Triton's bundled ptxas is missing")
    assert rc == 0, report
    assert "aot_check: 0 failure(s)" in report, report
    kinds = re.findall(r"^sm_90 bf16 (\w+) ", report, flags=re.M)
    assert {"forward", "backward", "siglip", "distill"} <= set(kinds), report
    capped = len(re.findall(r"^sm_90 bf16 \w+ .* regs128 ", report, flags=re.M))
    assert capped == 2, report
    rows = [(m.group(1), int(m.group(2))) for m in re.finditer(
        r"^sm_90 bf16 (?:forward|backward|distill) (.*) spill_stores=(\d+)B", report, flags=re.M)
        if " regs128 " not in m.group(1)]
    assert len(rows) == kinds.count("forward") + kinds.count("backward") + kinds.count("distill") - capped, report
    assert max(b for name, b in rows if " nested " not in name) == 0, report
    assert max(b for name, b in rows if " nested " in name) <= 128, report


# ---- GPU only: real tensor-core dots, default block table, large N, torch.compile ----

@pytest.fixture
def default_blocks():
    """GPU tests use the production configuration table, not the small test blocks."""
    with kconfig.override(None):
        yield


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k,d", [(77, 77, 33), (1000, 1000, 129), (4096, 4096, 512), (3000, 5000, 768)])
def test_gpu_default_configs(default_blocks, dtype, m, k, d):
    """Tensor-core tl.dot (the bf16 MMA the interpreter cannot run) with the real tile sizes."""
    _check_block(features(m, d, dtype, device=DEV), features(k, d, dtype, device=DEV), scale=100.0, bias=-2.0)


@pytest.mark.gpu
def test_gpu_tf32_follows_torch(default_blocks):
    """fp32 with TF32 allowed: errors at TF32 level (2^-11), not garbage."""
    torch.set_float32_matmul_precision("high")
    img, txt = features(2048, 512, device=DEV), features(2048, 512, device=DEV)
    sc = torch.tensor(100.0, device=DEV)
    r_row, _, _ = reference_block(img.cpu(), txt.cpu(), 100.0)
    lse_row, _, _ = triton_backend.lse_forward(img, txt, sc)
    _close(lse_row, r_row, 2.0 ** -9 * 100.0, "lse_row tf32")


@pytest.mark.gpu
def test_gpu_large_n_vs_torch_backend(default_blocks):
    """N = 65536, D = 512 bf16 against the exact chunked torch backend (fp32 on GPU)."""
    n, d = 65536, 512
    img, txt = features(n, d, torch.bfloat16, device=DEV), features(n, d, torch.bfloat16, device=DEV)
    sc = torch.tensor(50.0, device=DEV)
    got = triton_backend.lse_forward(img, txt, sc)
    ref = torch_backend.lse_forward(img, txt, sc)
    for g, r, what in zip(got, ref, ("lse_row", "lse_col", "diag")):
        _close(g, r, 1e-4 * 50.0, what)
    coefs = (1 / (2 * n), 1 / (2 * n), 1 / n)
    gi, gt, gs = triton_backend.grad_backward(img, txt, sc, None, ref[0], ref[1], *coefs)
    ti, tt, ts = torch_backend.grad_backward(img, txt, sc, None, ref[0], ref[1], *coefs)
    _close(gi, ti, 2 * EPS[torch.bfloat16] * ti.abs().max().item() + 1e-7, "d_img")
    _close(gt, tt, 2 * EPS[torch.bfloat16] * tt.abs().max().item() + 1e-7, "d_txt")
    _close(gs, ts, 1e-2 * abs(ts.item()) + 1e-4, "d_scale")


@pytest.mark.gpu
def test_gpu_extra_memory_is_o_n_d(default_blocks, monkeypatch):
    """Nothing N x N: the extra peak is O(N*D) (norm pre-pass, fp32 gradients) plus the
    backward's bounded workspace, far below one N x N bf16 matrix (8 GiB here)."""
    monkeypatch.setenv("CLIP_FAST_WORKSPACE_MB", "64")
    n, d = 65536, 512
    img, txt = features(n, d, torch.bfloat16, device=DEV), features(n, d, torch.bfloat16, device=DEV)
    sc = torch.tensor(30.0, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lse_row, lse_col, _ = triton_backend.lse_forward(img, txt, sc)
    torch.cuda.synchronize()
    fwd_extra = torch.cuda.max_memory_allocated() - base
    assert fwd_extra < 4 * n * d + 64 * n * 4 + 2**20, f"forward extra peak {fwd_extra} B"
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    triton_backend.grad_backward(img, txt, sc, None, lse_row, lse_col, 1 / (2 * n), 1 / (2 * n), 1 / n)
    torch.cuda.synchronize()
    bwd_extra = torch.cuda.max_memory_allocated() - base
    bound = 64 * 2**20 + 4 * (2 * n * d * 4) + 64 * n * 4
    assert bwd_extra < bound, f"backward extra peak {bwd_extra} B > {bound} B"


@pytest.mark.gpu
def test_gpu_forward_op_compiles_fullgraph(default_blocks):
    """The forward triton_op under torch.compile (inductor, fullgraph): it traces into the
    op and launches our kernels itself; values match eager."""
    def f(img, txt, s):
        return torch.ops.clip_fast.triton_lse_forward(img, txt, s, None)

    img, txt = features(300, 64, torch.bfloat16, device=DEV), features(200, 64, torch.bfloat16, device=DEV)
    s = torch.tensor(10.0, device=DEV)
    eager = f(img, txt, s)
    compiled = torch.compile(f, fullgraph=True)(img, txt, s)
    for a, b, what in zip(compiled, eager, ("lse_row", "lse_col", "diag")):
        _close(a, b, 1e-4, what)


@pytest.mark.gpu
def test_gpu_torch_compile_module(default_blocks):
    """torch.compile(FastClipLoss(backend='triton')): no graph break, same loss and grads."""
    from clip_fast import FastClipLoss, backends

    assert backends.unavailable_reason("triton", DEV, torch.bfloat16) is None
    img = features(1024, 256, torch.bfloat16, device=DEV).requires_grad_(True)
    txt = features(1024, 256, torch.bfloat16, device=DEV).requires_grad_(True)
    scale = torch.tensor(30.0, device=DEV, requires_grad=True)
    eager = FastClipLoss(backend="triton")
    compiled = torch.compile(FastClipLoss(backend="triton"), fullgraph=True)
    l1 = eager(img, txt, scale)
    g1 = torch.autograd.grad(l1, [img, txt, scale])
    l2 = compiled(img, txt, scale)
    g2 = torch.autograd.grad(l2, [img, txt, scale])
    _close(l2, l1, 1e-3, "loss")
    for a, b, what in zip(g2, g1, ("d_img", "d_txt", "d_scale")):
        _close(a, b, 1e-2 * b.abs().max().item() + 1e-6, what)


@pytest.mark.gpu
def test_gpu_autotune_path(default_blocks, monkeypatch):
    """CLIP_FAST_AUTOTUNE=1: the tuned launches (trial runs undone) give the same values."""
    monkeypatch.setenv("CLIP_FAST_AUTOTUNE", "1")
    _check_block(features(1000, 129, torch.bfloat16, device=DEV), features(900, 129, torch.bfloat16, device=DEV),
                 scale=50.0, bias=1.0)
