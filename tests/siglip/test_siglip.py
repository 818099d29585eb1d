"""SigLIP: every backend against an independent float64 materialised reference.

Judged as in tests/test_exactness.py: in each dtype a backend's error against the float64
loss and gradients of the same (dtype-rounded) inputs is at most FACTOR times the error of
PyTorch's own materialised sigmoid loss in that dtype (floor: one unit of the dtype times
the reference's norm).  The cuda backend runs the same cases on a GPU (marked ``gpu``).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from reference import reference_siglip_loss  # noqa: E402

import clip_fast  # noqa: E402
from helpers import DTYPE_UNIT as UNIT, PRECISION_FACTOR as FACTOR, backend_params  # noqa: E402
from clip_fast.siglip import backends as siglip_backends  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAMES = ("loss", "d_img", "d_txt", "d_scale", "d_bias")


def _features(n, d, seed, noise=1.0):
    """Unit image rows and text rows near them (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    t = F.normalize(x + noise * torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    return x, t


def _materialised(x, t, scale, bias, ids, dtype):
    """PyTorch's materialised sigmoid loss and gradients with everything in ``dtype``."""
    xm = x.to(dtype).requires_grad_(True)
    tm = t.to(dtype).requires_grad_(True)
    sm = torch.tensor(scale, dtype=dtype, requires_grad=True)
    bm = torch.tensor(bias, dtype=dtype, requires_grad=True)
    logits = sm * xm @ tm.T + bm
    n = x.shape[0]
    pos = torch.eye(n, dtype=torch.bool) if ids is None else ids[:, None] == ids[None, :]
    z = pos.to(dtype) * 2 - 1
    loss = -F.logsigmoid(z * logits).sum() / n
    loss.backward()
    return loss.detach(), xm.grad, tm.grad, sm.grad, bm.grad


def _fused(x, t, scale, bias, ids, dtype, backend, **kw):
    xf = x.to(device=DEV, dtype=dtype).requires_grad_(True)
    tf = t.to(device=DEV, dtype=dtype).requires_grad_(True)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    sf = torch.tensor(scale, dtype=sdt, device=DEV, requires_grad=True)
    bf = torch.tensor(bias, dtype=sdt, device=DEV, requires_grad=True)
    loss = clip_fast.siglip_loss(xf, tf, sf, bf, group_ids=None if ids is None else ids.to(DEV),
                                 backend=backend, **kw)
    loss.backward()
    return loss.detach(), xf.grad, tf.grad, sf.grad, bf.grad


def _skip_unless(backend, dtype):
    reason = siglip_backends.unavailable_reason(backend, DEV, dtype)
    if reason is not None:
        pytest.skip(reason)


def _check_once(x, t, scale, bias, dtype, backend, ids=None, **kw):
    _skip_unless(backend, dtype)
    x, t = x.to(dtype).double(), t.to(dtype).double()
    ref = reference_siglip_loss(x, t, scale, bias, ids)
    mat = _materialised(x, t, scale, bias, ids, torch.float64 if dtype == torch.float64 else dtype)
    got = _fused(x, t, scale, bias, ids, dtype, backend, **kw)
    for what, g, m, r in zip(NAMES, got, mat, ref):
        g, m = g.double().cpu(), m.double().cpu()
        assert torch.isfinite(g).all(), f"{backend} {dtype} {what}: not finite"
        err = (g - r).norm().item()
        m_err = (m - r).norm().item() if torch.isfinite(m).all() else float("inf")
        allowed = FACTOR * max(m_err, UNIT[dtype] * r.norm().item()) + 1e-300
        assert err <= allowed, (f"{backend} {dtype} {what}: error {err:.3e} > {FACTOR} x materialised "
                                f"{allowed / FACTOR:.3e} (|ref| {r.norm().item():.3e})")


# ---- shapes: N in {1, 2, 77, 1025}, D in {1, 33, 129, 512} ----

SHAPES = [(n, d) for n in (1, 2, 77, 1025) for d in (1, 33, 129, 512)]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("n,d", SHAPES, ids=lambda v: str(v))
def test_shapes_fp32(backend, n, d, kernel_blocks):
    """Every shape of the grid at SigLIP's initialisation (scale 10, bias -10)."""
    if backend == "triton" and DEV.type == "cpu" and n * d > 77 * 512:
        pytest.skip("interpreter: the largest shapes run in test_large_triton")
    x, t = _features(n, d, seed=n * 1000 + d)
    _check_once(x, t, 10.0, -10.0, torch.float32, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("n,d", [(1025, 129)], ids=lambda v: str(v))
def test_large_triton(backend, n, d, kernel_blocks):
    """The N = 1025 shapes through the Triton kernels (interpreter on CPU: slow)."""
    x, t = _features(n, d, seed=n * 1000 + d)
    _check_once(x, t, 10.0, -10.0, torch.float32, backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale,bias", [(1.0, 0.0), (10.0, -10.0), (100.0, -10.0), (100.0, 5.0),
                                        (30.0, 3.0)], ids=lambda v: str(v))
def test_scales_and_biases(backend, dtype, scale, bias):
    """Scale up to 100 and biases of both signs, in every kernel dtype."""
    x, t = _features(77, 33, seed=7, noise=0.5)
    _check_once(x, t, scale, bias, dtype, backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_group_ids(backend, dtype):
    """Pairs with equal ids are positives of each other (5 groups over 77 pairs)."""
    x, t = _features(77, 33, seed=11)
    ids = torch.randint(0, 5, (77,), generator=torch.Generator().manual_seed(3))
    _check_once(x, t, 10.0, -10.0, dtype, backend, ids=ids)


@pytest.mark.parametrize("backend", backend_params())
def test_distinct_ids_are_the_plain_loss(backend):
    """All ids distinct gives exactly the diagonal labels."""
    _skip_unless(backend, torch.float32)
    x, t = _features(40, 17, seed=5)
    plain = _fused(x, t, 10.0, -10.0, None, torch.float32, backend)
    ids = _fused(x, t, 10.0, -10.0, torch.arange(40) * 7 - 3, torch.float32, backend)
    for a, b in zip(plain, ids):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_confident_pairs_at_scale_100(backend):
    """Every pair right by |S| = 90: each term e^-90 ~ 2^-130 is below fp32's normal range,
    their sum over 100^2 pairs is not; each is summed scaled by 2^96, not flushed."""
    _skip_unless(backend, torch.float32)
    x = torch.eye(100, dtype=torch.float64)
    got = _fused(x, x.clone(), 180.0, -90.0, None, torch.float32, backend)[0].double().cpu()
    ref = reference_siglip_loss(x, x, 180.0, -90.0)[0]
    assert 1.2e-38 < ref < 1e-37
    assert abs(got - ref) <= 4 * 2.0 ** -24 * ref, (got.item(), ref.item())


@pytest.mark.parametrize("backend", backend_params())
def test_large_logits_do_not_overflow(backend):
    """Pairs wrong by |S| = 1e4: softplus(x) = x, no exp of a large positive number."""
    _skip_unless(backend, torch.float32)
    x = torch.eye(3, 4, dtype=torch.float64)
    got = _fused(x, -x, 1e4, 0.0, None, torch.float32, backend)
    ref = reference_siglip_loss(x, -x, 1e4, 0.0)
    for what, g, r in zip(NAMES, got, ref):
        assert torch.isfinite(g).all(), what
        torch.testing.assert_close(g.double().cpu(), r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
def test_chunks_and_blocks(backend, monkeypatch):
    """A workspace of a few tiles (many blocks) and small torch strips give the same answer."""
    _skip_unless(backend, torch.float32)
    monkeypatch.setenv("CLIP_FAST_WORKSPACE_MB", "0.004")
    x, t = _features(77, 33, seed=13)
    kw = {"chunk_size": 7} if backend == "torch" else {}
    _check_once(x, t, 10.0, -10.0, torch.float32, backend, **kw)


@pytest.mark.parametrize("backend", backend_params())
def test_no_grad_forward(backend):
    """Under no_grad the forward skips the gradient GEMMs and gives the same loss."""
    _skip_unless(backend, torch.float32)
    x, t = _features(40, 17, seed=17)
    xf, tf = x.float().to(DEV), t.float().to(DEV)
    with torch.no_grad():
        a = clip_fast.siglip_loss(xf, tf, 10.0, -10.0, backend=backend)
    b = _fused(x, t, 10.0, -10.0, None, torch.float32, backend)[0]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_float64_torch_backend_matches_reference():
    """float64 through the torch backend: the reference to float64 rounding."""
    x, t = _features(33, 9, seed=19)
    ids = torch.tensor([0, 1, 1] * 11)
    got = _fused(x, t, 20.0, -5.0, ids, torch.float64, "torch")
    ref = reference_siglip_loss(x, t, 20.0, -5.0, ids)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)


# ---- open_clip parity, the module, autocast, compile ----

def test_open_clip_parity():
    """FastSigLipLoss equals open_clip's SigLipLoss on one process (loss and gradients)."""
    open_clip_loss = pytest.importorskip("open_clip.loss")
    x, t = _features(64, 32, seed=23)
    outs = []
    for cls in (open_clip_loss.SigLipLoss, clip_fast.FastSigLipLoss):
        xi = x.float().requires_grad_(True)
        ti = t.float().requires_grad_(True)
        s = torch.tensor(10.0, requires_grad=True)
        b = torch.tensor(-10.0, requires_grad=True)
        out = cls()(xi, ti, s, b, output_dict=True)
        assert set(out) == {"contrastive_loss"}
        out["contrastive_loss"].backward()
        outs.append((out["contrastive_loss"].detach(), xi.grad, ti.grad, s.grad, b.grad))
    for what, a, b in zip(NAMES, *outs):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=1e-6, msg=what)


def test_module_keywords():
    """open_clip 3.3.0's constructor, and older releases' bidir / use_horovod."""
    loss = clip_fast.FastSigLipLoss(cache_labels=True, rank=0, world_size=1, dist_impl="gather")
    assert loss.dist_impl == "gather"
    assert clip_fast.FastSigLipLoss(bidir=False).dist_impl == "shift"
    assert clip_fast.FastSigLipLoss(bidir=True).dist_impl == "bidir"
    assert clip_fast.FastSigLipLoss().dist_impl == "bidir"
    with pytest.raises(ValueError, match="bidir=False"):
        clip_fast.FastSigLipLoss(bidir=False, dist_impl="bidir")
    with pytest.raises(NotImplementedError, match="use_horovod"):
        clip_fast.FastSigLipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl"):
        clip_fast.FastSigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="rank"):
        clip_fast.FastSigLipLoss(rank=2, world_size=2)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(5, dtype=torch.int64), r"group_ids must have shape \(N,\) = \(4,\)"),
    (torch.zeros(4, 1, dtype=torch.int64), r"group_ids must have shape"),
    (torch.zeros(4), r"group_ids must be an integer tensor"),
    ([0, 1, 2, 3], r"group_ids must be an \(N,\) integer torch.Tensor"),
])
def test_group_ids_errors(bad, match):
    x = torch.randn(4, 3)
    with pytest.raises((TypeError, ValueError), match=match):
        clip_fast.siglip_loss(x, x.clone(), 10.0, -10.0, group_ids=bad)


def test_group_ids_wrong_device():
    x = torch.randn(4, 3)
    ids = torch.zeros(4, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="group_ids is on meta"):
        clip_fast.siglip_loss(x, x.clone(), 10.0, -10.0, group_ids=ids)


def test_input_errors_name_the_argument():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same batch size"):
        clip_fast.siglip_loss(x, torch.randn(5, 3), 10.0, -10.0)
    with pytest.raises(ValueError, match="logit_bias must hold exactly one element"):
        clip_fast.siglip_loss(x, x.clone(), 10.0, torch.zeros(2))
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        clip_fast.siglip_loss(x, x.clone(), 10.0, -10.0, backend="cuda") if DEV.type == "cpu" else \
            (_ for _ in ()).throw(RuntimeError("backend='cuda'"))


@pytest.mark.parametrize("backend", backend_params())
def test_autocast(backend):
    """Under autocast the features run in the autocast dtype and the loss is float32."""
    dtype = torch.bfloat16
    _skip_unless(backend, dtype)
    x, t = _features(40, 17, seed=29)
    xf = x.float().to(DEV).requires_grad_(True)
    tf = t.float().to(DEV).requires_grad_(True)
    with torch.autocast(DEV.type, dtype=dtype):
        loss = clip_fast.siglip_loss(xf, tf, 10.0, -10.0, backend=backend)
    assert loss.dtype == torch.float32
    loss.backward()
    assert xf.grad.dtype == torch.float32
    ref = reference_siglip_loss(x.to(dtype).double(), t.to(dtype).double(), 10.0, -10.0)
    assert abs(loss.item() - ref[0].item()) <= 1e-3 * ref[0].item()


@pytest.mark.parametrize("backend", backend_params())
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) of the module: same loss and gradients as eager."""
    _skip_unless(backend, torch.float32)
    mod = clip_fast.FastSigLipLoss(backend=backend)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager" if DEV.type == "cpu" else "inductor")
    x, t = _features(40, 17, seed=31)
    outs = []
    for fn in (mod, compiled):
        xi = x.float().to(DEV).requires_grad_(True)
        ti = t.float().to(DEV).requires_grad_(True)
        s = torch.tensor(10.0, device=DEV, requires_grad=True)
        b = torch.tensor(-10.0, device=DEV, requires_grad=True)
        loss = fn(xi, ti, s, b)
        loss.backward()
        outs.append((loss.detach(), xi.grad, ti.grad, s.grad, b.grad))
    for what, a, b in zip(NAMES, *outs):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=what)


def test_double_backward_raises():
    x = torch.randn(6, 4, requires_grad=True)
    loss = clip_fast.siglip_loss(x, torch.randn(6, 4), 10.0, -10.0)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@pytest.mark.slow
@pytest.mark.parametrize("dtype,labels", [(torch.bfloat16, 1), (torch.float32, 2)], ids=str)
def test_triton_kernel_compiles_for_sm90(dtype, labels):
    """The SigLIP tile kernel's declared variants through Triton's full compiler for sm_90,
    no GPU (the route ``python -m clip_fast.kernels.aot_check`` takes)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the kernel was decorated under the interpreter; run with TRITON_INTERPRET=0")
    from clip_fast.kernels import aot_check, siglip

    (variant,) = [v for v in siglip.aot_variants(dtype, 90)
                  if v.constexprs["LABELS"] == labels and v.kernel is siglip._siglip_tile_kernel]
    assert variant.tile.BM == 64 and variant.tile.BN == 128  # the GPU tile of siglip.tile_config
    compiled = aot_check.compile_variant(variant, arch=90)
    assert compiled.asm["cubin"]


def test_distributed_is_the_one_name_dist_impl_and_bidir_are_aliases():
    """``distributed=`` is the name every loss module takes; open_clip's ``dist_impl`` (and
    its older ``bidir``) name the same choice, and conflicting values raise naming both."""
    assert clip_fast.FastSigLipLoss(distributed="shift").dist_impl == "shift"
    assert clip_fast.FastSigLipLoss(dist_impl="reduce").distributed == "reduce"
    assert clip_fast.FastSigLipLoss(distributed="shift", bidir=False).distributed == "shift"
    assert clip_fast.FastSigLipLoss().distributed == "bidir"
    with pytest.raises(ValueError, match="distributed='gather' and dist_impl='shift'"):
        clip_fast.FastSigLipLoss(dist_impl="shift", distributed="gather")
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        clip_fast.FastSigLipLoss(distributed="ring")
