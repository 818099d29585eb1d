"""Backward without a G workspace: d_img and d_txt accumulated in-kernel from the recomputed tile.

The same contract as ``kernels/grad_backward.py`` (G = coef_row P_row + coef_col P_col -
coef_diag I, d_img = s G @ txt, d_txt = s G.T @ img, d_scale = sum_ij G_ij <img_i, txt_j>),
selected by ``config.Configs.backward_kind == "fused"`` (the variants ``fused_bwd`` and
``share_exp+fused_bwd``; docs/gpu_variants.md).  G never reaches device memory.

Layout: one kernel, launched twice.  A program owns BM rows of S (d_img, ``TRANSPOSED``
False) or BN columns (d_txt, True) and DV of the D output features; it sweeps the other
dimension tile by tile and, per tile of S:

1. recomputes ``acc = img_blk @ txt_blk.T`` with ``tile_dot`` at the forward's BM, BN, BK
   (the same fp32 accumulation order, so S2 is the forward's bit for bit in both launches);
2. forms G exactly as the workspace kernel does (float-float lse, the diagonal from
   ``g_diag``, one shared exponential per tile where allowed) and rounds ``G * gscale`` to the
   input dtype, the value the workspace kernel would store;
3. accumulates ``out_blk += G_q @ txt_blk[:, dv]`` (or ``G_q.T @ img_blk[:, dv]``) in fp32
   registers; the row launch's first feature chunk also sums d_scale per row in float64.
The output block is written once, at the end: no atomics, nothing N x N, and the result
does not depend on scheduling.

Why two launches (split over the owned dimension) rather than one launch with atomics: a
single sweep that owns row blocks could add each tile's ``G.T @ img_blk`` into d_txt with
atomics, saving one recompute, but that is (N / BM) x N x D fp32 atomic adds: 1.7e10 at
N = 65,536, D = 512, BM = 128, 69 GB of L2 read-modify-write on sm_90 -- more time than the
recompute it saves (one N x N x D GEMM, about 6.7 ms at 0.7 of the bf16 peak) by the
cost model of benchmarks/results/kernel_prediction_sm90_2026-12-04.md, and order-dependent
rounding.  The owned output block (BM x DV fp32) lives in registers, so DV splits D when
BM x D does not fit; each extra chunk costs one more recompute of the tiles.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import config as _config
from .lse_forward import share_budget
from .tile import shared_exp_g, tile_dot, two_exp_g

_LOG2E_K = tl.constexpr(1.4426950408889634)


@triton.jit
def _g_of_tile(img_ptr, txt_ptr, lse_row_ptr, lse_row_lo_ptr, lse_col_ptr, lse_col_lo_ptr,
               g_diag_ptr, offs_m, offs_n, M, K, D, stride_im, stride_id, stride_tk, stride_td,
               scale2, bias2, coef_row, coef_col, coef_diag,
               HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_DIAG: tl.constexpr,
               G_DIAG: tl.constexpr, SHARE_EXP: tl.constexpr, SHARE_BUDGET: tl.constexpr,
               EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Steps 1-2 for the tile (offs_m, offs_n): (G masked to the valid entries, acc)."""
    row_ok = offs_m < M
    col_ok = offs_n < K
    img_rows = img_ptr + offs_m.to(tl.int64)[:, None] * stride_im
    txt_cols = txt_ptr + offs_n.to(tl.int64)[None, :] * stride_tk
    acc = tile_dot(img_rows, txt_cols, row_ok, col_ok, D, stride_id, stride_td,
                   EVEN_D, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)
    s2 = acc * scale2 + bias2
    r_hi = tl.load(lse_row_ptr + offs_m, mask=row_ok & HAS_ROW, other=0.0)
    r_lo = tl.load(lse_row_lo_ptr + offs_m, mask=row_ok & HAS_ROW, other=0.0)
    c_hi = tl.load(lse_col_ptr + offs_n, mask=col_ok & HAS_COL, other=0.0)
    c_lo = tl.load(lse_col_lo_ptr + offs_n, mask=col_ok & HAS_COL, other=0.0)
    if SHARE_EXP:
        g = shared_exp_g(s2, r_hi, r_lo, c_hi, c_lo, row_ok, col_ok, coef_row, coef_col, SHARE_BUDGET)
    elif HAS_ROW and HAS_COL:
        g = two_exp_g(s2, r_hi, r_lo, c_hi, c_lo, coef_row, coef_col)
    elif HAS_ROW:
        g = coef_row * tl.exp2((s2 - r_hi[:, None]) - r_lo[:, None])
    elif HAS_COL:
        g = coef_col * tl.exp2((s2 - c_hi[None, :]) - c_lo[None, :])
    else:
        g = tl.zeros((BM, BN), tl.float32)
    eq = offs_m[:, None] == offs_n[None, :]
    if G_DIAG:
        g_ii = tl.load(g_diag_ptr + offs_m, mask=row_ok & (offs_m < K), other=0.0)
        g = tl.where(eq, g_ii[:, None], g)
    elif HAS_DIAG:
        g = tl.where(eq, g - coef_diag, g)
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    return g, acc


# One kernel body for both launches: the sweep is the whole kernel, its two orientations
# side by side so that they visibly form the same G.
@triton.jit
def _fused_grad_kernel(
    img_ptr, txt_ptr, scale_ptr, bias_ptr, lse_row_ptr, lse_row_lo_ptr, lse_col_ptr,
    lse_col_lo_ptr, g_diag_ptr, out_ptr, d_scale_ptr,
    M, K, D, stride_im, stride_id, stride_tk, stride_td, stride_om,
    coef_row, coef_col, coef_diag, gscale,
    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
    HAS_DIAG: tl.constexpr, G_DIAG: tl.constexpr, SHARE_EXP: tl.constexpr,
    SHARE_BUDGET: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DV: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_v = pid_v * DV + tl.arange(0, DV)
    v_ok = offs_v < D
    scale2 = tl.load(scale_ptr).to(tl.float32) * _LOG2E_K
    if HAS_BIAS:
        bias2 = tl.load(bias_ptr).to(tl.float32) * _LOG2E_K
    else:
        bias2 = 0.0
    q_ty = img_ptr.dtype.element_ty
    if TRANSPOSED:
        # d_txt[cols] = sum over row tiles of G_q.T @ img[rows, dv].
        offs_n = pid_o * BN + tl.arange(0, BN)
        out = tl.zeros((BN, DV), tl.float32)
        for start_m in range(0, M, BM):
            offs_m = start_m + tl.arange(0, BM)
            g, acc = _g_of_tile(img_ptr, txt_ptr, lse_row_ptr, lse_row_lo_ptr, lse_col_ptr,
                                lse_col_lo_ptr, g_diag_ptr, offs_m, offs_n, M, K, D, stride_im,
                                stride_id, stride_tk, stride_td, scale2, bias2, coef_row, coef_col,
                                coef_diag, HAS_ROW, HAS_COL, HAS_DIAG, G_DIAG, SHARE_EXP,
                                SHARE_BUDGET, EVEN_D, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)
            gq = (g * gscale).to(q_ty)
            other = tl.load(img_ptr + offs_m.to(tl.int64)[:, None] * stride_im + offs_v[None, :] * stride_id,
                            mask=(offs_m < M)[:, None] & v_ok[None, :], other=0.0)
            if DOT_UPCAST:
                gq = gq.to(tl.float32)
                other = other.to(tl.float32)
            out = tl.dot(tl.trans(gq), other, out, input_precision=DOT_PRECISION)
        offs_o = offs_n
        o_ok = offs_n < K
    else:
        # d_img[rows] = sum over column tiles of G_q @ txt[cols, dv]; d_scale per row.
        offs_m = pid_o * BM + tl.arange(0, BM)
        out = tl.zeros((BM, DV), tl.float32)
        ds = tl.zeros((BM,), tl.float64)
        for start_n in range(0, K, BN):
            offs_n = start_n + tl.arange(0, BN)
            g, acc = _g_of_tile(img_ptr, txt_ptr, lse_row_ptr, lse_row_lo_ptr, lse_col_ptr,
                                lse_col_lo_ptr, g_diag_ptr, offs_m, offs_n, M, K, D, stride_im,
                                stride_id, stride_tk, stride_td, scale2, bias2, coef_row, coef_col,
                                coef_diag, HAS_ROW, HAS_COL, HAS_DIAG, G_DIAG, SHARE_EXP,
                                SHARE_BUDGET, EVEN_D, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)
            ds += tl.sum(g * acc, axis=1).to(tl.float64)
            gq = (g * gscale).to(q_ty)
            other = tl.load(txt_ptr + offs_n.to(tl.int64)[:, None] * stride_tk + offs_v[None, :] * stride_td,
                            mask=(offs_n < K)[:, None] & v_ok[None, :], other=0.0)
            if DOT_UPCAST:
                gq = gq.to(tl.float32)
                other = other.to(tl.float32)
            out = tl.dot(gq, other, out, input_precision=DOT_PRECISION)
        offs_o = offs_m
        o_ok = offs_m < M
        tl.store(d_scale_ptr + offs_m, ds, mask=o_ok & (pid_v == 0))
    tl.store(out_ptr + offs_o.to(tl.int64)[:, None] * stride_om + offs_v[None, :], out,
             mask=o_ok[:, None] & v_ok[None, :])


def dv_cap(dtype: torch.dtype, arch: int) -> int:
    """The largest DV for inputs of ``dtype`` on sm_<arch>: 256 for 2-byte inputs on sm_90 (a
    64 x 256 fp32 block is 64 registers a thread at 8 warps and the BN x 256 operand strip fits
    shared memory; aot_check), 128 for fp32 inputs or sm_80 (twice the bytes, or 163 KiB)."""
    return 256 if arch >= 90 and dtype != torch.float32 else 128


def feature_chunk(D: int, device: torch.device, dtype: torch.dtype) -> int:
    """DV, the output features a program owns: D (rounded up to a power of two) up to
    ``dv_cap`` on a GPU, up to 128 in the interpreter."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        cap = dv_cap(dtype, 10 * major + minor)
    else:
        cap = 128
    return min(cap, max(16, triton.next_power_of_2(D)))


def fused_grad_backward(img, txt, scale, bias, lse_row, lse_col, coef_row: float, coef_col: float,
                        coef_diag: float, g_diag=None):
    """(d_img, d_txt, d_scale) as ``grad_backward._grad_backward_impl`` (without ``split_scale``),
    for a non-empty sweep (``grad_backward`` answers the empty ones itself)."""
    M, D = img.shape
    K = txt.shape[0]
    has_row, has_col = coef_row != 0.0, coef_col != 0.0
    if has_row and lse_row is None:
        raise ValueError("grad_backward: coef_row != 0 needs lse_row, got None")
    if has_col and lse_col is None:
        raise ValueError("grad_backward: coef_col != 0 needs lse_col, got None")
    dev, f32 = img.device, torch.float32
    cfg = _config.get_configs(dev, img.dtype)
    t = cfg.backward
    gmax = max(abs(coef_row) + abs(coef_col), abs(coef_diag))
    gscale = 2.0 ** math.floor(-math.log2(gmax))
    d_img = torch.empty((M, D), device=dev, dtype=f32)
    d_txt = torch.empty((K, D), device=dev, dtype=f32)
    d_scale_rows = torch.zeros((M,), device=dev, dtype=torch.float64)
    zeros = d_img.new_zeros((2, 1))
    lse_row_t = lse_row.contiguous() if has_row else zeros
    lse_col_t = lse_col.contiguous() if has_col else zeros
    g_diag_t = g_diag.to(f32).contiguous() if g_diag is not None else d_scale_rows
    dv = feature_chunk(D, dev, img.dtype)
    common = dict(
        M=M, K=K, D=D, stride_im=img.stride(0), stride_id=img.stride(1),
        stride_tk=txt.stride(0), stride_td=txt.stride(1), stride_om=D,
        coef_row=float(coef_row), coef_col=float(coef_col), coef_diag=float(coef_diag),
        gscale=float(gscale), HAS_BIAS=bias is not None, HAS_ROW=has_row, HAS_COL=has_col,
        HAS_DIAG=coef_diag != 0.0, G_DIAG=g_diag is not None,
        SHARE_EXP=bool(cfg.share_exp) and has_row and has_col, SHARE_BUDGET=share_budget(img.dtype),
        EVEN_D=D % t.BK == 0, DOT_PRECISION=_config.dot_precision(img.dtype),
        DOT_UPCAST=_config.interpreter_active() and img.dtype == torch.bfloat16,
        BM=t.BM, BN=t.BN, BK=t.BK, DV=dv, num_warps=t.num_warps, num_stages=t.num_stages)
    ptrs = (img, txt, scale, bias if bias is not None else scale, lse_row_t[0], lse_row_t[1],
            lse_col_t[0], lse_col_t[1], g_diag_t)
    n_v = triton.cdiv(D, dv)
    _fused_grad_kernel[(triton.cdiv(M, t.BM), n_v)](*ptrs, d_img, d_scale_rows, TRANSPOSED=False, **common)
    _fused_grad_kernel[(triton.cdiv(K, t.BN), n_v)](*ptrs, d_txt, d_scale_rows, TRANSPOSED=True, **common)
    factor = scale.to(f32) / gscale
    return d_img.mul_(factor), d_txt.mul_(factor), d_scale_rows.sum().to(f32)


def aot_variants(dtype: torch.dtype, arch: int):
    """The compile variants of ``_fused_grad_kernel`` (``python -m clip_fast.kernels.aot_check``)."""
    prec = "tf32" if dtype == torch.float32 else "ieee"
    base = dict(TRANSPOSED=False, HAS_BIAS=False, HAS_ROW=True, HAS_COL=True, HAS_DIAG=True,
                G_DIAG=True, SHARE_EXP=False, SHARE_BUDGET=share_budget(dtype), EVEN_D=True,
                DOT_PRECISION=prec, DOT_UPCAST=False, DV=dv_cap(dtype, arch),
                stride_id=1, stride_td=1)
    variants = [("rows d_img", base), ("cols d_txt", dict(base, TRANSPOSED=True)),
                ("rows shared-exp", dict(base, SHARE_EXP=True)),
                ("cols shared-exp", dict(base, TRANSPOSED=True, SHARE_EXP=True))]
    feat = _config.feature_ptr(dtype)
    ints = frozenset({"M", "K", "D", "stride_im", "stride_tk", "stride_om"})
    # The variant's own tile (config.VARIANT_TILES): the owned BM x DV fp32 block is in registers.
    tile = _config.VARIANT_TILES["fused_bwd"]
    if dtype == torch.float32:
        tile = _config.KernelConfig(tile.BM, tile.BN, 32, tile.num_warps, tile.num_stages)
    for name, ce in variants:
        yield _config.AotVariant(
            "fused_bwd", name, _fused_grad_kernel, tile, ce,
            ints=ints, div16=ints, floats=frozenset({"coef_row", "coef_col", "coef_diag", "gscale"}),
            pointers=(("img_ptr", feat), ("txt_ptr", feat), ("d_scale_ptr", "*fp64")))
