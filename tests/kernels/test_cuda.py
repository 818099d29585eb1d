"""The CUDA C++ backend (csrc/, clip_fast._C).

Two groups:
* CPU-runnable: the extension imports when it was built, its ops are registered, the fake
  implementations give the right shapes and dtypes, the C++ input checks name the tensor,
  and ``unavailable_reason`` explains itself.  Skipped where the extension was not built.
* ``gpu``: the kernels against the float64 materialised reference (tests/reference.py)
  and against the torch backend, on odd and rectangular shapes, every dtype, scale up to
  100, bias, every gradient, strided inputs and the column-underflow fallback.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from clip_fast import clip_loss
from clip_fast.clip import backends
from clip_fast.clip.backends import cuda_backend, torch_backend
from helpers import paired_features
from reference import (reference_block, reference_block_grads, reference_block_magnitudes,
                       reference_block_scale_split, reference_clip_loss, reference_magnitudes)

needs_ext = pytest.mark.skipif(cuda_backend._C is None,
                               reason=f"clip_fast._C not built: {cuda_backend._IMPORT_ERROR}")
OPS = torch.ops.clip_fast_cuda if cuda_backend._C is not None else None


# --------------------------------------------------------------------------------------------
# CPU-runnable
# --------------------------------------------------------------------------------------------

@needs_ext
def test_extension_imports_and_reports_archs():
    archs = cuda_backend.compiled_archs()
    assert archs, f"compiled_archs() parsed nothing from {cuda_backend._C.compiled_archs()!r}"
    for major, minor, _ in archs:
        assert (major, minor) >= (8, 0)


@needs_ext
def test_ops_registered_with_schemas():
    fwd = torch.ops.clip_fast_cuda.lse_forward.default._schema
    bwd = torch.ops.clip_fast_cuda.grad_backward.default._schema
    assert [a.name for a in fwd.arguments] == ["img", "txt", "scale", "bias", "allow_tf32"]
    assert fwd.arguments[-1].default_value is None  # None: follow torch's TF32 setting
    assert [a.name for a in bwd.arguments] == [
        "img", "txt", "scale", "bias", "lse_row", "lse_col", "coef_row", "coef_col", "coef_diag",
        "g_diag", "allow_tf32"]
    assert len(fwd.returns) == 3 and len(bwd.returns) == 3


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,d", [(5, 5, 3), (7, 4, 33), (3, 9, 1)])
def test_meta_shapes(m, k, d, dtype):
    """The registered fake implementations give the contract's shapes and dtypes (float64 lse)."""
    img = torch.empty(m, d, dtype=dtype, device="meta")
    txt = torch.empty(k, d, dtype=dtype, device="meta")
    scale = torch.empty((), device="meta")
    lse_row, lse_col, diag = OPS.lse_forward(img, txt, scale, None, True)
    assert (lse_row.shape, lse_col.shape, diag.shape) == ((m,), (k,), (min(m, k),))
    assert lse_row.dtype == lse_col.dtype == diag.dtype == torch.float64
    d_img, d_txt, d_scale = OPS.grad_backward(img, txt, scale, scale, lse_row, lse_col,
                                              0.5, 0.5, 1.0, None, False)
    assert (d_img.shape, d_txt.shape, d_scale.shape) == ((m, d), (k, d), ())
    assert d_img.dtype == d_txt.dtype == d_scale.dtype == torch.float32


@needs_ext
def test_fake_tensor_mode_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        img = torch.empty(6, 8, dtype=torch.bfloat16)
        txt = torch.empty(4, 8, dtype=torch.bfloat16)
        scale = torch.empty(())
        lse_row, lse_col, diag = OPS.lse_forward(img, txt, scale, None, False)
        d_img, d_txt, d_scale = OPS.grad_backward(img, txt, scale, None, lse_row, None,
                                                  1.0, 0.0, 1.0, None, False)
    assert (tuple(lse_row.shape), tuple(lse_col.shape), tuple(diag.shape)) == ((6,), (4,), (4,))
    assert (tuple(d_img.shape), tuple(d_txt.shape), d_scale.dim()) == ((6, 8), (4, 8), 0)
    assert d_img.dtype == torch.float32


@needs_ext
def test_export_keeps_ops_whole():
    """torch.export traces through the fake implementations (no real kernel runs): each op
    is one node of the graph, with the contract's output shapes."""
    class Block(torch.nn.Module):
        def forward(self, img, txt, scale):
            lse_row, lse_col, diag = torch.ops.clip_fast_cuda.lse_forward(img, txt, scale, None)
            d_img, d_txt, d_scale = torch.ops.clip_fast_cuda.grad_backward(
                img, txt, scale, None, lse_row, lse_col, 0.25, 0.25, 0.5)
            return lse_row.sum() + lse_col.sum() - 2 * diag.sum(), d_img, d_txt, d_scale

    args = (torch.randn(6, 8), torch.randn(6, 8), torch.tensor(3.0))
    ep = torch.export.export(Block(), args)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "clip_fast_cuda.lse_forward.default" in targets
    assert "clip_fast_cuda.grad_backward.default" in targets
    outs = [n for n in ep.graph.nodes if n.op == "output"][0].args[0]
    shapes = [tuple(o.meta["val"].shape) for o in outs]
    assert shapes == [(), (6, 8), (6, 8), ()]


def _cpu_args(m=4, k=3, d=5, dtype=torch.float32):
    return (torch.randn(m, d, dtype=dtype), torch.randn(k, d, dtype=dtype), torch.tensor(2.0))


@needs_ext
@pytest.mark.parametrize("mutate,match", [
    (lambda a: (a[0][None], a[1], a[2], None), r"img must be a 2-D \(M, D\) tensor, got shape \[1, 4, 5\]"),
    (lambda a: (a[0], a[1][:, :2], a[2], None), r"same feature size D, got img \[4, 5\] and txt \[3, 2\]"),
    (lambda a: (a[0].double(), a[1].double(), a[2], None), r"img must be float16, bfloat16 or float32, got Double"),
    (lambda a: (a[0], a[1].half(), a[2], None), r"txt must have img's dtype Float, got Half"),
    (lambda a: (a[0], a[1], a[2].reshape(1), None), r"scale must be a 0-d tensor, got shape \[1\]"),
    (lambda a: (a[0], a[1], a[2].double(), None), r"scale must be float32, got Double"),
    (lambda a: (a[0], a[1], a[2], torch.zeros(2)), r"bias must be a 0-d tensor, got shape \[2\]"),
    (lambda a: (a[0], a[1], a[2], None), r"img must be a CUDA tensor, got device cpu"),
])
def test_forward_checks_name_the_tensor(mutate, match):
    img, txt, scale, bias = mutate(_cpu_args())
    with pytest.raises(RuntimeError, match=match):
        OPS.lse_forward(img, txt, scale, bias, False)


@needs_ext
def test_backward_checks_name_the_tensor():
    img, txt, scale = _cpu_args()
    lse_row, lse_col = torch.zeros(2, 4), torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match=r"lse_row is required when coef_row != 0"):
        OPS.grad_backward(img, txt, scale, None, None, lse_col, 0.5, 0.5, 1.0, None, False)
    with pytest.raises(RuntimeError, match=r"lse_col is required when coef_col != 0"):
        OPS.grad_backward(img, txt, scale, None, lse_row, None, 0.5, 0.5, 1.0, None, False)
    with pytest.raises(RuntimeError, match=r"lse_row must have shape \(2, 4\) \(hi and lo in log2 units\), got \[3\]"):
        OPS.grad_backward(img, txt, scale, None, torch.zeros(3), lse_col, 0.5, 0.5, 1.0, None, False)
    with pytest.raises(RuntimeError, match=r"lse_col must be float32, got Double"):
        OPS.grad_backward(img, txt, scale, None, lse_row, lse_col.double(), 0.5, 0.5, 1.0, None, False)
    with pytest.raises(RuntimeError, match=r"g_diag must have shape \(3\), got \[4\]"):
        OPS.grad_backward(img, txt, scale, None, lse_row, lse_col, 0.5, 0.5, 1.0, torch.zeros(4), False)
    with pytest.raises(RuntimeError, match=r"coef_row, coef_col and coef_diag must be finite"):
        OPS.grad_backward(img, txt, scale, None, lse_row, lse_col, math.inf, 0.5, 1.0, None, False)
    with pytest.raises(RuntimeError, match=r"img must be a CUDA tensor, got device cpu"):
        OPS.grad_backward(img, txt, scale, None, lse_row, lse_col, 0.5, 0.5, 1.0, None, False)
    # A zero coefficient switches its term off, so its lse may be None: only the device fails.
    with pytest.raises(RuntimeError, match=r"img must be a CUDA tensor"):
        OPS.grad_backward(img, txt, scale, None, None, None, 0.0, 0.0, 1.0, None, False)


def _fake_grad_op(img, txt, scale, bias, lse_row, lse_col, coef_row, coef_col, coef_diag, g_diag):
    """The C++ grad_backward op's contract, materialised in float64 on CPU (lse pairs in log2
    units, g_diag replacing the diagonal, zeros when every coefficient is 0)."""
    x, y = img.double(), txt.double()
    raw = x @ y.T
    logits = float(scale) * raw + (0.0 if bias is None else float(bias))
    if max(abs(coef_row), abs(coef_col), abs(coef_diag)) == 0.0:
        return torch.zeros_like(x), torch.zeros_like(y), torch.zeros((), dtype=torch.float64)
    lse = lambda pair: (pair[0].double() + pair[1].double()) / backends.LOG2E  # noqa: E731
    grad = torch.zeros_like(logits)
    if coef_row:
        grad += coef_row * torch.exp(logits - lse(lse_row)[:, None])
    if coef_col:
        grad += coef_col * torch.exp(logits - lse(lse_col)[None, :])
    idx = torch.arange(min(logits.shape))
    if g_diag is not None:
        grad[idx, idx] = g_diag.double()
    else:
        grad[idx, idx] -= coef_diag
    return float(scale) * grad @ y, float(scale) * grad.T @ x, (grad * raw).sum()


class _TorchWithFakeOps:
    """``torch`` for cuda_backend, with the extension's op replaced by ``_fake_grad_op``."""
    ops = type("ops", (), {"clip_fast_cuda": type("ns", (), {"grad_backward": staticmethod(_fake_grad_op)})})

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.mark.parametrize("with_diag,coefs", [(False, (0.3, 0.2, 0.0)), (True, (0.3, 0.2, 0.4)),
                                             (True, (0.3, 0.0, 0.0)), (False, (0.0, 0.2, 0.1))])
def test_split_scale_by_two_op_calls(monkeypatch, with_diag, coefs):
    """The CUDA backend's split_scale (two calls of the unchanged op) gives the contract's split
    and the unsplit gradients; runs on CPU with the op's contract emulated in float64."""
    monkeypatch.setattr(cuda_backend, "torch", _TorchWithFakeOps())
    img, txt = torch.randn(7, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    s = torch.tensor(2.0)
    lse_row, lse_col, diag = torch_backend.lse_forward(img, txt, s.double())
    kw = dict(diag=diag) if with_diag else {}
    whole = cuda_backend.grad_backward(img, txt, s, None, lse_row, lse_col, *coefs, **kw)
    split = cuda_backend.grad_backward(img, txt, s, None, lse_row, lse_col, *coefs, split_scale=True, **kw)
    assert split[2].shape == (2,)
    torch.testing.assert_close(split[0], whole[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(split[1], whole[1], rtol=1e-6, atol=1e-7)
    want = reference_block_scale_split(img, txt, 2.0, None, *coefs, with_diag)
    torch.testing.assert_close(split[2], want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(split[2].sum(), whole[2], rtol=1e-6, atol=1e-7)


def test_unavailable_reason_messages():
    reason = cuda_backend.unavailable_reason(torch.device("cpu"), torch.float32)
    assert reason is not None
    if cuda_backend._C is None:
        assert "clip_fast._C" in reason and "CLIP_FAST_BUILD_CUDA=1" in reason
    else:
        assert "needs CUDA tensors, got device cpu" in reason
        r64 = cuda_backend.unavailable_reason(torch.device("cuda"), torch.float64)
        assert "float64" in r64 and "backend='torch'" in r64
        if not torch.cuda.is_available():
            r = cuda_backend.unavailable_reason(torch.device("cuda"), torch.float16)
            assert "no CUDA device is available" in r


def test_unavailable_reason_when_not_built(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_IMPORT_ERROR", "the CUDA extension clip_fast._C is not available (x)")
    reason = cuda_backend.unavailable_reason(torch.device("cuda"), torch.float16)
    assert "clip_fast._C is not available" in reason


def test_backend_cuda_by_name_raises_clearly_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run"):
        clip_loss(img, txt, 10.0, backend="cuda")


def test_not_auto_picked():
    assert "cuda" not in backends.AUTO_ORDER_CUDA


@needs_ext
def test_arch_matching(monkeypatch):
    """sm_XY machine code runs on X.Z for Z >= Y only; PTX runs on anything newer."""
    monkeypatch.setattr(cuda_backend, "compiled_archs", lambda: [(8, 0, False), (9, 0, False)])
    assert cuda_backend._runs_on((8, 0)) and cuda_backend._runs_on((8, 6))
    assert cuda_backend._runs_on((9, 0))
    assert not cuda_backend._runs_on((10, 0)) and not cuda_backend._runs_on((12, 0))
    monkeypatch.setattr(cuda_backend, "compiled_archs", lambda: [(9, 0, True)])
    assert cuda_backend._runs_on((10, 0)) and not cuda_backend._runs_on((8, 6))


# --------------------------------------------------------------------------------------------
# GPU: kernels against the float64 reference and the torch backend
# --------------------------------------------------------------------------------------------

def _tf32(enabled: bool):
    """Context: set both of torch's float32 matmul switches, restore them after."""
    class _Ctx:
        def __enter__(self):
            self.prec = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high" if enabled else "highest")

        def __exit__(self, *exc):
            torch.set_float32_matmul_precision(self.prec)
    return _Ctx()


# (dtype, tf32, tolerance as a fraction of the cancelling magnitude) -- forward, backward.
# Inputs are compared against float64 on the *same rounded inputs*, so 16-bit inputs only
# pay fp32 accumulation in the forward; the backward pays the G workspace rounding
# (bf16: 2^-9, fp16: 2^-11 relative) and tf32 pays operand rounding (2^-11) everywhere.
PRECISIONS = [
    pytest.param(torch.float32, False, 2e-5, 5e-5, id="fp32"),
    pytest.param(torch.float32, True, 3e-3, 1e-2, id="tf32"),
    pytest.param(torch.float16, False, 5e-5, 5e-3, id="fp16"),
    pytest.param(torch.bfloat16, False, 5e-5, 2e-2, id="bf16"),
]


def _max_err(got, ref, magnitude):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got).all(), "non-finite output"
    if got.numel() == 0:
        return 0.0
    return (got - ref).abs().max().item() / max(magnitude, 1e-30)


def _check_block(m, k, d, dtype, tf32, tol_f, tol_b, scale, bias, coefs=None, normalise=True,
                 img=None, txt=None):
    if img is None:
        img, txt = paired_features(m, k, d, dtype, normalise, device="cuda")
    m, k = img.shape[0], txt.shape[0]
    coef_row, coef_col, coef_diag = coefs or (1 / (2 * m), 1 / (2 * m), 1 / m)
    s = torch.tensor(scale, device="cuda")
    b = None if bias is None else torch.tensor(bias, device="cuda")
    ref_row, ref_col, ref_diag = reference_block(img.cpu(), txt.cpu(), scale, bias)
    mag_logit, mag_img, mag_txt, mag_scale = reference_block_magnitudes(img, txt, scale, bias, coef_row, coef_col, coef_diag)
    with _tf32(tf32):
        lse_row, lse_col, diag = cuda_backend.lse_forward(img, txt, s, b)
        d_img, d_txt, d_scale = cuda_backend.grad_backward(
            img, txt, s, b, lse_row, lse_col, coef_row, coef_col, coef_diag)
        t_row, t_col, t_diag = torch_backend.lse_forward(img, txt, s, b)
        t_img, t_txt, t_scale = torch_backend.grad_backward(
            img, txt, s, b, t_row, t_col, coef_row, coef_col, coef_diag)
    torch.cuda.synchronize()
    ref_img, ref_txt, ref_scale = reference_block_grads(img.cpu(), txt.cpu(), scale, bias,
                                                        coef_row, coef_col, coef_diag)
    for got, tgot, ref, mag, tol, what in [
        (lse_row, t_row, ref_row, mag_logit, tol_f, "lse_row"),
        (lse_col, t_col, ref_col, mag_logit, tol_f, "lse_col"),
        (diag, t_diag, ref_diag, mag_logit, tol_f, "diag"),
        (d_img, t_img, ref_img, mag_img, tol_b, "d_img"),
        (d_txt, t_txt, ref_txt, mag_txt, tol_b, "d_txt"),
        (d_scale, t_scale, ref_scale, mag_scale, tol_b, "d_scale"),
    ]:
        assert got.dtype == torch.float32, what
        err = _max_err(got, ref, mag)
        terr = _max_err(tgot, ref, mag)
        # Against float64, and never far worse than the torch backend in the same setting.
        assert err <= max(tol, 4 * terr), f"{what}: cuda error {err:.3g} (torch backend {terr:.3g}), tol {tol}"


SHAPES = [(1, 1, 1), (2, 2, 33), (77, 77, 129), (77, 77, 1), (130, 130, 512)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32,tol_f,tol_b", PRECISIONS)
@pytest.mark.parametrize("n,k,d", SHAPES)
@pytest.mark.parametrize("scale,bias", [(1.0, None), (100.0, -10.0)])
def test_block_square(n, k, d, dtype, tf32, tol_f, tol_b, scale, bias):
    _check_block(n, k, d, dtype, tf32, tol_f, tol_b, scale, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32,tol_f,tol_b", PRECISIONS)
@pytest.mark.parametrize("d", [1, 33, 129, 512])
def test_block_n1025(d, dtype, tf32, tol_f, tol_b):
    """N = 1025: 17 row and column tiles, the last one holding a single row/column."""
    _check_block(1025, 1025, d, dtype, tf32, tol_f, tol_b, 100.0, 3.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32,tol_f,tol_b", PRECISIONS)
@pytest.mark.parametrize("m,k,d", [(77, 200, 33), (200, 77, 129), (1, 65, 64), (300, 129, 7)])
@pytest.mark.parametrize("coefs", [None, (0.3, 0.0, 0.5), (0.0, 0.7, 0.2)])
def test_block_rectangular(m, k, d, dtype, tf32, tol_f, tol_b, coefs):
    """Rectangular blocks (the distributed modes), zero coefficients switching terms off."""
    _check_block(m, k, d, dtype, tf32, tol_f, tol_b, 20.0, 1.5, coefs=coefs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32,tol_f,tol_b", PRECISIONS)
def test_block_many_rows_unsplit(dtype, tf32, tol_f, tol_b):
    """M large enough (>= 4 CTAs per SM of row blocks) that the forward grid does not split
    the columns: one CTA owns its rows' whole log-sum-exp."""
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    m = 64 * 4 * n_sms + 37
    _check_block(m, 100, 16, dtype, tf32, tol_f, tol_b, 10.0, None, coefs=(0.5 / m, 0.5 / m, 1.0 / m))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32,tol_f,tol_b", PRECISIONS)
def test_backward_many_strips(monkeypatch, dtype, tf32, tol_f, tol_b):
    """A tiny G workspace (CLIP_FAST_WORKSPACE_MB) forces 64- or 128-row strips: d_txt is
    accumulated over strips, the last strip is partial."""
    monkeypatch.setenv("CLIP_FAST_WORKSPACE_MB", "0.02")
    _check_block(300, 150, 40, dtype, tf32, tol_f, tol_b, 25.0, 0.5)


@pytest.mark.gpu
def test_backward_huge_workspace_setting(monkeypatch):
    """A workspace budget far beyond int64 rows is clamped (one strip), not overflowed."""
    monkeypatch.setenv("CLIP_FAST_WORKSPACE_MB", "1e300")
    _check_block(130, 70, 24, torch.float32, False, 2e-5, 5e-5, 25.0, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32,tol_f,tol_b", PRECISIONS)
def test_strided_inputs(dtype, tf32, tol_f, tol_b):
    """Non-contiguous img/txt (a transposed view and a column slice) give the same result."""
    base_img, base_txt = paired_features(96, 90, 48, dtype, device="cuda")
    img = base_img.T.contiguous().T            # column-major storage
    txt = torch.cat([base_txt, base_txt], 1)[:, ::2]  # stride 2 along D
    assert not img.is_contiguous() and not txt.is_contiguous()
    _check_block(0, 0, 0, dtype, tf32, tol_f, tol_b, 30.0, None, img=img, txt=txt)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32,tol_f,tol_b", PRECISIONS)
def test_misaligned_contiguous_inputs(dtype, tf32, tol_f, tol_b):
    """Contiguous views starting one element into their storage: the 16-byte vector loads
    must be refused (scalar path) even though D is a multiple of the vector width."""
    m, d = 100, 64
    a, b = paired_features(m, m, d, dtype, device="cuda")
    img = torch.empty(m * d + 1, dtype=dtype, device="cuda")[1:].view(m, d)
    txt = torch.empty(m * d + 1, dtype=dtype, device="cuda")[1:].view(m, d)
    img.copy_(a)
    txt.copy_(b)
    assert img.is_contiguous() and img.data_ptr() % 16 != 0
    _check_block(0, 0, 0, dtype, tf32, tol_f, tol_b, 30.0, 0.5, img=img, txt=txt)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32,tol_f,tol_b", PRECISIONS)
def test_column_underflow_fallback(dtype, tf32, tol_f, tol_b):
    """Columns whose every logit sits ~200 nats under the shared shift are recomputed exactly.

    Every image is close to one direction u and text column 3 is -u: at scale 100 its
    column sum underflows the shifted accumulator and the fallback must take over.
    """
    m, d = 150, 64
    u = F.normalize(torch.randn(d, dtype=torch.float64), dim=0)
    img = F.normalize(u + 0.05 * torch.randn(m, d, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.3 * torch.randn(m, d, dtype=torch.float64), dim=-1)
    txt[3] = -u
    txt[100] = -u
    img, txt = img.to("cuda", dtype), txt.to("cuda", dtype)
    ref_row, ref_col, _ = reference_block(img.cpu(), txt.cpu(), 100.0, None)
    assert ref_col[3] < ref_col.max() - 150, "the test no longer exercises the fallback"
    _check_block(0, 0, 0, dtype, tf32, tol_f, tol_b, 100.0, None, img=img, txt=txt)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32,tol_f,tol_b", PRECISIONS)
def test_unnormalised_large_norm_row(dtype, tf32, tol_f, tol_b):
    """One image row 30x longer loosens the shared bound for every column (fallback everywhere)."""
    img, txt = paired_features(200, 200, 40, torch.float64, device="cuda")
    img[7] *= 30.0
    _check_block(0, 0, 0, dtype, tf32, tol_f, tol_b, 10.0, None, img=img.to(dtype), txt=txt.to(dtype))


@pytest.mark.gpu
def test_identical_embeddings():
    """All rows identical: every logit equal, lse = S + ln N exactly, gradients cancel."""
    v = F.normalize(torch.randn(1, 64), dim=-1).expand(300, 64).contiguous().cuda()
    _check_block(0, 0, 0, torch.float32, False, 2e-5, 5e-5, 100.0, None, img=v, txt=v)


@pytest.mark.gpu
def test_zero_vectors():
    """Zero embeddings: S = bias everywhere (the shift bound is exactly tight)."""
    z = torch.zeros(70, 16, device="cuda")
    _check_block(0, 0, 0, torch.float32, False, 2e-5, 5e-5, 50.0, 2.0, img=z, txt=z.clone())


def _loss_and_grads(img, txt, scale, bias, backend):
    x, y = img.detach().clone().requires_grad_(True), txt.detach().clone().requires_grad_(True)
    s = torch.tensor(scale, device="cuda", requires_grad=True)
    b = torch.tensor(bias, device="cuda", requires_grad=True)
    loss = clip_loss(x, y, s, b, backend=backend)
    loss.backward()
    return loss.detach(), x.grad, y.grad, s.grad, b.grad


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32,tol_f,tol_b", PRECISIONS)
def test_loss_and_grads_vs_reference(dtype, tf32, tol_f, tol_b):
    """The full loss through clip_loss(backend='cuda'), every input's gradient, against
    float64 and (never far worse than) the torch backend in the same dtype and setting."""
    img, txt = paired_features(257, 257, 96, dtype, device="cuda")
    with _tf32(tf32):
        got = _loss_and_grads(img, txt, 50.0, -2.0, "cuda")
        base = _loss_and_grads(img, txt, 50.0, -2.0, "torch")
    ref = reference_clip_loss(img.cpu(), txt.cpu(), 50.0, -2.0)
    mags = reference_magnitudes(img.cpu(), txt.cpu(), 50.0, -2.0)
    low = dtype != torch.float32  # results are rounded to the dtype: 2^-9 (bf16) relative
    tols = [max(tol_f, 4e-3 if low else 0.0)] + [tol_b + (8e-3 if low else 0.0)] * 3
    for what, g, t, r, mag, tol in zip(["loss", "d_img", "d_txt", "d_scale"], got, base, ref, mags, tols):
        err, terr = _max_err(g.float(), r, mag), _max_err(t.float(), r, mag)
        assert err <= max(tol, 4 * terr), f"{what}: cuda error {err:.3g} (torch backend {terr:.3g}), tol {tol}"
    assert got[4] is not None and got[4].abs().item() == 0.0  # d_bias: a shared bias cancels


@pytest.mark.gpu
def test_opcheck():
    """torch.library.opcheck: schema, fake implementation and real kernel agree."""
    img, txt = paired_features(70, 50, 24, torch.bfloat16, device="cuda")
    s, b = torch.tensor(12.0, device="cuda"), torch.tensor(0.5, device="cuda")
    torch.library.opcheck(torch.ops.clip_fast_cuda.lse_forward.default, (img, txt, s, b, None))
    lse_row, lse_col, _ = cuda_backend.lse_forward(img, txt, s, b)
    torch.library.opcheck(torch.ops.clip_fast_cuda.grad_backward.default,
                          (img, txt, s, b, lse_row, lse_col, 0.01, 0.01, 0.02, None))


@pytest.mark.gpu
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_module_fullgraph(compile_backend):
    """torch.compile(FastClipLoss(backend='cuda')) keeps the custom ops in one graph
    (fullgraph=True raises on a break); same loss and gradient as eager."""
    from clip_fast import FastClipLoss

    img, txt = paired_features(64, 64, 32, torch.float32, device="cuda")
    scale = torch.tensor(20.0, device="cuda")
    mod = torch.compile(FastClipLoss(backend="cuda"), backend=compile_backend, fullgraph=True)
    a = img.clone().requires_grad_(True)
    loss = mod(a, txt, scale)
    loss.backward()
    b = img.clone().requires_grad_(True)
    ref = FastClipLoss(backend="cuda")(b, txt, scale)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_runs_on_current_stream_and_device():
    """Work is queued on the current stream: results read after that stream synchronises."""
    img, txt = paired_features(300, 300, 64, torch.float16, device="cuda")
    s = torch.tensor(30.0, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        lse_row, lse_col, diag = cuda_backend.lse_forward(img, txt, s, None)
    side.synchronize()
    ref_row, ref_col, ref_diag = reference_block(img.cpu(), txt.cpu(), 30.0, None)
    assert _max_err(lse_row, ref_row, 31.0) < 5e-5 and _max_err(lse_col, ref_col, 31.0) < 5e-5


@pytest.mark.gpu
def test_empty_blocks():
    """M or K = 0: log-sum-exp of an empty set is -inf, gradients are zero."""
    s = torch.tensor(10.0, device="cuda")
    img, txt = torch.randn(0, 8, device="cuda"), torch.randn(5, 8, device="cuda")
    lse_row, lse_col, diag = cuda_backend.lse_forward(img, txt, s, None)
    assert lse_row.shape == (0,) and diag.shape == (0,) and torch.isneginf(lse_col).all()
    d_img, d_txt, d_scale = cuda_backend.grad_backward(img, txt, s, None, lse_row, lse_col, 1.0, 1.0, 1.0)
    assert d_img.shape == (0, 8) and (d_txt == 0).all() and d_scale.item() == 0.0
