"""Triton sweeps of open_clip's distillation term (``clip_fast.distill``), nothing N x N stored.

Same contract as ``clip_fast.distill.backends.torch_backend`` (read its module doc for the maths):
student S = s * img @ txt.T, teacher T = t * timg @ ttxt.T on one (M, K) block, the four
float64 log-sum-exps known from ``lse_forward``.  Each lse arrives as the float-float pair
of ``clip_fast.core.numerics.kernel_lse`` (log2 units): P = 2^((X2 - hi) - lo) and the gap
lse - S = ((hi - S2) + lo) * ln 2 are exact near the top of a row, as in grad_backward.py.
Student and teacher may have different embedding dimensions (D and TD).

Forward (one sweep).  The grid runs over row blocks of BM rows; each program loops over
the column blocks and, per tile:
1. recomputes both tiles, S2 and T2 (fp32 accumulation, log2 units);
2. row terms: sum_j PT_row_ij * gap_row_ij, accumulated in registers over the loop;
3. column terms: sum_i PT_col_ij * gap_col_ij, one relaxed fp32 atomic add per column.
   The lse values are known, so every summand is a bounded non-negative number and the
   merge is a plain sum, valid in any order (no running max as in lse_forward.py).

Backward (one sweep).  In workspace blocks of R x C (CLIP_FAST_WORKSPACE_MB, as in
grad_backward.py), a kernel recomputes each tile once and writes
    G_S = coef_row (PS_row - PT_row) + coef_col (PS_col - PT_col)
    G_T = coef_row PT_row (gap_row - row_term_i) + coef_col PT_col (gap_col - col_term_j)
into two float32 workspaces (G_T only when the teacher needs gradients) and reduces
d_scale and d_tscale per row (float64 atomics); the gradient GEMMs then run in torch
in float32.  float32 workspaces rather than the input dtype: |G_T| has no bound known
before the sweep (it grows with the gap lse - S), so no power-of-two scaling can
guarantee that it fits float16.

These launchers are plain functions, not torch.library ops: under torch.compile the
distillation term is a graph break (the CLIP loss's ops are registered; see
lse_forward.py).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import config as _config
from ..core.numerics import kernel_lse
from .workspace import block_shape
from .tile import tile_dot

NAME = "triton"
# Tiles (ptxas figures from ``python -m clip_fast.kernels.distill_aot``; speed unmeasured):
# a tile here holds two fp32 accumulators (S and T) and up to four P blocks, so the CLIP
# kernels' 128 x 128 tiles spill (sm_90 backward: ~2.2 KB of spill stores per thread), and
# so does 64 x 128 with triton 3.6 (24 B in the backward with teacher gradients).  64 x 64
# with 8 warps spills in no variant on sm_80 or sm_90, bf16 or fp32, with triton 3.6 (the
# GPU card's), nor on sm_90 with triton 3.8 (sm_80 fp32 row-only forward: 24 B).
GPU_TILE = _config.KernelConfig(BM=64, BN=64, BK=64, num_warps=8, num_stages=3)
_LOG2E_K = tl.constexpr(1.4426950408889634)
_LN2_K = tl.constexpr(0.6931471805599453)
LN2 = 0.6931471805599453


@triton.jit
def _distill_forward_kernel(
    img_ptr, txt_ptr, timg_ptr, ttxt_ptr, scale_ptr, tscale_ptr,
    r_hi_ptr, r_lo_ptr, c_hi_ptr, c_lo_ptr, tr_hi_ptr, tr_lo_ptr, tc_hi_ptr, tc_lo_ptr,
    row_term_ptr, col_term_ptr,
    M, K, D, TD,
    stride_im, stride_id, stride_tk, stride_td, stride_sm, stride_sd, stride_uk, stride_ud,
    HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, EVEN_D: tl.constexpr, EVEN_TD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    row_ok = offs_m < M
    img_rows = img_ptr + offs_m.to(tl.int64)[:, None] * stride_im
    timg_rows = timg_ptr + offs_m.to(tl.int64)[:, None] * stride_sm
    s2 = tl.load(scale_ptr).to(tl.float32) * _LOG2E_K
    t2 = tl.load(tscale_ptr).to(tl.float32) * _LOG2E_K
    # Padded rows read lse 0: their P and gap stay finite and are masked out below.
    if HAS_ROW:
        r_hi = tl.load(r_hi_ptr + offs_m, mask=row_ok, other=0.0)
        r_lo = tl.load(r_lo_ptr + offs_m, mask=row_ok, other=0.0)
        tr_hi = tl.load(tr_hi_ptr + offs_m, mask=row_ok, other=0.0)
        tr_lo = tl.load(tr_lo_ptr + offs_m, mask=row_ok, other=0.0)
    row_acc = tl.zeros((BM,), tl.float32)
    for start_n in range(0, K, BN):
        offs_n = start_n + tl.arange(0, BN)
        col_ok = offs_n < K
        ok = row_ok[:, None] & col_ok[None, :]
        # 1. Both tiles (masked loads read 0 outside the block; those entries are masked).
        a = tile_dot(img_rows, txt_ptr + offs_n.to(tl.int64)[None, :] * stride_tk, row_ok, col_ok,
                     D, stride_id, stride_td, EVEN_D, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)
        b = tile_dot(timg_rows, ttxt_ptr + offs_n.to(tl.int64)[None, :] * stride_uk, row_ok, col_ok,
                     TD, stride_sd, stride_ud, EVEN_TD, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)
        S2 = a * s2
        T2 = b * t2
        # 2. Row terms, kept in registers.
        if HAS_ROW:
            pt = tl.exp2((T2 - tr_hi[:, None]) - tr_lo[:, None])
            gap = (r_hi[:, None] - S2) + r_lo[:, None]
            row_acc += tl.sum(tl.where(ok, pt * gap, 0.0), axis=1)
        # 3. Column terms: this row block's share, one atomic add per column.
        if HAS_COL:
            c_hi = tl.load(c_hi_ptr + offs_n, mask=col_ok, other=0.0)
            c_lo = tl.load(c_lo_ptr + offs_n, mask=col_ok, other=0.0)
            tc_hi = tl.load(tc_hi_ptr + offs_n, mask=col_ok, other=0.0)
            tc_lo = tl.load(tc_lo_ptr + offs_n, mask=col_ok, other=0.0)
            pt = tl.exp2((T2 - tc_hi[None, :]) - tc_lo[None, :])
            gap = (c_hi[None, :] - S2) + c_lo[None, :]
            tl.atomic_add(col_term_ptr + offs_n, tl.sum(tl.where(ok, pt * gap, 0.0), axis=0),
                          mask=col_ok, sem="relaxed")
    if HAS_ROW:
        tl.store(row_term_ptr + offs_m, row_acc, mask=row_ok)


@triton.jit
def _distill_backward_kernel(
    img_ptr, txt_ptr, timg_ptr, ttxt_ptr, scale_ptr, tscale_ptr,
    r_hi_ptr, r_lo_ptr, c_hi_ptr, c_lo_ptr, tr_hi_ptr, tr_lo_ptr, tc_hi_ptr, tc_lo_ptr,
    row_term_ptr, col_term_ptr, ws_s_ptr, ws_t_ptr, d_scale_ptr, d_tscale_ptr,
    row0, col0, R, C, D, TD,
    stride_im, stride_id, stride_tk, stride_td, stride_sm, stride_sd, stride_uk, stride_ud, stride_wr,
    coef_row, coef_col,
    HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, TEACHER: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_TD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    offs_r = tl.program_id(0) * BM + tl.arange(0, BM)   # row inside the workspace block
    offs_c = tl.program_id(1) * BN + tl.arange(0, BN)   # column inside the workspace block
    row_ok = offs_r < R
    col_ok = offs_c < C
    ok = row_ok[:, None] & col_ok[None, :]
    offs_m = row0 + offs_r
    offs_n = col0 + offs_c
    # 1. Recompute both tiles once.
    a = tile_dot(img_ptr + offs_m.to(tl.int64)[:, None] * stride_im,
                 txt_ptr + offs_n.to(tl.int64)[None, :] * stride_tk, row_ok, col_ok,
                 D, stride_id, stride_td, EVEN_D, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)
    b = tile_dot(timg_ptr + offs_m.to(tl.int64)[:, None] * stride_sm,
                 ttxt_ptr + offs_n.to(tl.int64)[None, :] * stride_uk, row_ok, col_ok,
                 TD, stride_sd, stride_ud, EVEN_TD, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)
    S2 = a * (tl.load(scale_ptr).to(tl.float32) * _LOG2E_K)
    T2 = b * (tl.load(tscale_ptr).to(tl.float32) * _LOG2E_K)
    # 2. G_S and G_T, one direction at a time (padded rows/columns read 0, masked below).
    gs = tl.zeros((BM, BN), tl.float32)
    gt = tl.zeros((BM, BN), tl.float32)
    if HAS_ROW:
        r_hi = tl.load(r_hi_ptr + offs_m, mask=row_ok, other=0.0)
        r_lo = tl.load(r_lo_ptr + offs_m, mask=row_ok, other=0.0)
        tr_hi = tl.load(tr_hi_ptr + offs_m, mask=row_ok, other=0.0)
        tr_lo = tl.load(tr_lo_ptr + offs_m, mask=row_ok, other=0.0)
        pt = tl.exp2((T2 - tr_hi[:, None]) - tr_lo[:, None])
        gs += coef_row * (tl.exp2((S2 - r_hi[:, None]) - r_lo[:, None]) - pt)
        if TEACHER:
            rt = tl.load(row_term_ptr + offs_m, mask=row_ok, other=0.0)
            gap = ((r_hi[:, None] - S2) + r_lo[:, None]) * _LN2_K
            gt += coef_row * pt * (gap - rt[:, None])
    if HAS_COL:
        c_hi = tl.load(c_hi_ptr + offs_n, mask=col_ok, other=0.0)
        c_lo = tl.load(c_lo_ptr + offs_n, mask=col_ok, other=0.0)
        tc_hi = tl.load(tc_hi_ptr + offs_n, mask=col_ok, other=0.0)
        tc_lo = tl.load(tc_lo_ptr + offs_n, mask=col_ok, other=0.0)
        pt = tl.exp2((T2 - tc_hi[None, :]) - tc_lo[None, :])
        gs += coef_col * (tl.exp2((S2 - c_hi[None, :]) - c_lo[None, :]) - pt)
        if TEACHER:
            ct = tl.load(col_term_ptr + offs_n, mask=col_ok, other=0.0)
            gap = ((c_hi[None, :] - S2) + c_lo[None, :]) * _LN2_K
            gt += coef_col * pt * (gap - ct[None, :])
    gs = tl.where(ok, gs, 0.0)
    # 3. d_scale per row (float64 cells), G_S into its workspace; the same for the teacher.
    tl.atomic_add(d_scale_ptr + offs_m, tl.sum(gs * a, axis=1).to(tl.float64), mask=row_ok, sem="relaxed")
    ws = offs_r.to(tl.int64)[:, None] * stride_wr + offs_c[None, :]
    tl.store(ws_s_ptr + ws, gs, mask=ok)
    if TEACHER:
        gt = tl.where(ok, gt, 0.0)
        tl.atomic_add(d_tscale_ptr + offs_m, tl.sum(gt * b, axis=1).to(tl.float64), mask=row_ok,
                      sem="relaxed")
        tl.store(ws_t_ptr + ws, gt, mask=ok)


def _pairs(lse: Optional[torch.Tensor], on: bool, like: torch.Tensor):
    """(hi, lo) float32 rows of kernel_lse, or dummies when the direction is off."""
    if not on or lse is None:
        z = like.new_zeros((1,), dtype=torch.float32)
        return z, z
    pair = kernel_lse(lse, 1.0)
    return pair[0].contiguous(), pair[1].contiguous()


def tile_config(device: torch.device, dtype: torch.dtype) -> _config.KernelConfig:
    """The tile for a launch: GPU_TILE on sm_80+ (BK halved for fp32, as config.table_configs
    does), the CLIP kernels' choice elsewhere (older GPUs, the interpreter)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return _config.get_configs(device, dtype).backward
    if dtype == torch.float32:
        return dataclasses.replace(GPU_TILE, BK=min(GPU_TILE.BK, 32))
    return GPU_TILE


def _common(img, txt, timg, ttxt):
    cfg = tile_config(img.device, img.dtype)
    return cfg, dict(
        stride_im=img.stride(0), stride_id=img.stride(1), stride_tk=txt.stride(0), stride_td=txt.stride(1),
        stride_sm=timg.stride(0), stride_sd=timg.stride(1), stride_uk=ttxt.stride(0), stride_ud=ttxt.stride(1),
        EVEN_D=img.shape[1] % cfg.BK == 0, EVEN_TD=timg.shape[1] % cfg.BK == 0,
        DOT_PRECISION=_config.dot_precision(img.dtype),
        DOT_UPCAST=_config.interpreter_active() and img.dtype == torch.bfloat16,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def distill_forward(img, txt, scale, timg, ttxt, tscale, lse_row, lse_col, tlse_row, tlse_col
                    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    M, K = img.shape[0], txt.shape[0]
    has_row, has_col = lse_row is not None, lse_col is not None
    cfg, args = _common(img, txt, timg, ttxt)
    row_term = torch.zeros((max(M, 1),), device=img.device, dtype=torch.float32)
    col_term = torch.zeros((max(K, 1),), device=img.device, dtype=torch.float32)
    ptrs = (img, txt, timg, ttxt, scale.float(), tscale.float(),
            *_pairs(lse_row, has_row, img), *_pairs(lse_col, has_col, img),
            *_pairs(tlse_row, has_row, img), *_pairs(tlse_col, has_col, img), row_term, col_term)
    _distill_forward_kernel[(triton.cdiv(M, cfg.BM),)](
        *ptrs, M, K, img.shape[1], timg.shape[1], **args, HAS_ROW=has_row, HAS_COL=has_col)
    # log2 units to natural units, in float64.
    return (row_term[:M].to(torch.float64) * LN2 if has_row else None,
            col_term[:K].to(torch.float64) * LN2 if has_col else None)


def distill_backward(img, txt, scale, timg, ttxt, tscale, lse_row, lse_col, tlse_row, tlse_col,
                     row_term, col_term, coef_row: float, coef_col: float, teacher_grad: bool):
    M, K = img.shape[0], txt.shape[0]
    dev, f32 = img.device, torch.float32
    has_row, has_col = bool(coef_row), bool(coef_col)
    cfg, args = _common(img, txt, timg, ttxt)
    d_img, d_txt = torch.zeros(img.shape, device=dev, dtype=f32), torch.zeros(txt.shape, device=dev, dtype=f32)
    d_scale_rows = torch.zeros((M,), device=dev, dtype=torch.float64)
    d_timg = torch.zeros(timg.shape, device=dev, dtype=f32) if teacher_grad else None
    d_ttxt = torch.zeros(ttxt.shape, device=dev, dtype=f32) if teacher_grad else None
    d_tscale_rows = torch.zeros((M,), device=dev, dtype=torch.float64)
    # Two float32 workspaces share the budget: 8 bytes per element of the block.
    R, C = block_shape(M, K, 8 if teacher_grad else 4, cfg.BM, cfg.BN)
    ws_s = torch.empty((R, C), device=dev, dtype=f32)
    ws_t = torch.empty((R, C), device=dev, dtype=f32) if teacher_grad else ws_s
    rt = row_term.to(f32).contiguous() if has_row else d_scale_rows
    ct = col_term.to(f32).contiguous() if has_col else d_scale_rows
    s32, t32 = scale.float(), tscale.float()
    lse = (*_pairs(lse_row, has_row, img), *_pairs(lse_col, has_col, img),
           *_pairs(tlse_row, has_row, img), *_pairs(tlse_col, has_col, img))
    for r0 in range(0, M, R):
        r = min(R, M - r0)
        for c0 in range(0, K, C):
            c = min(C, K - c0)
            grid = (triton.cdiv(r, cfg.BM), triton.cdiv(c, cfg.BN))
            _distill_backward_kernel[grid](
                img, txt, timg, ttxt, s32, t32, *lse, rt, ct, ws_s, ws_t, d_scale_rows, d_tscale_rows,
                r0, c0, r, c, img.shape[1], timg.shape[1], **args, stride_wr=C,
                coef_row=float(coef_row), coef_col=float(coef_col),
                HAS_ROW=has_row, HAS_COL=has_col, TEACHER=bool(teacher_grad))
            # The gradient GEMMs, in float32, from the workspaces.
            gs = ws_s.view(-1)[:r * C].view(r, C)[:, :c]
            d_img[r0:r0 + r].addmm_(gs, txt[c0:c0 + c].to(f32))
            d_txt[c0:c0 + c].addmm_(gs.t(), img[r0:r0 + r].to(f32))
            if teacher_grad:
                gt = ws_t.view(-1)[:r * C].view(r, C)[:, :c]
                d_timg[r0:r0 + r].addmm_(gt, ttxt[c0:c0 + c].to(f32))
                d_ttxt[c0:c0 + c].addmm_(gt.t(), timg[r0:r0 + r].to(f32))
    d_img.mul_(s32)
    d_txt.mul_(s32)
    d_scale = d_scale_rows.sum().to(f32)
    d_tscale = None
    if teacher_grad:
        d_timg.mul_(t32)
        d_ttxt.mul_(t32)
        d_tscale = d_tscale_rows.sum().to(f32)
    return d_img, d_txt, d_scale, d_timg, d_ttxt, d_tscale


def aot_variants(dtype: torch.dtype, arch: int):
    """The compile variants of the two distillation kernels (``python -m clip_fast.kernels.aot_check``),
    at the tile ``tile_config`` gives on sm_80+."""
    tile = dataclasses.replace(GPU_TILE, BK=min(GPU_TILE.BK, 32)) if dtype == torch.float32 else GPU_TILE
    feat = _config.feature_ptr(dtype)
    prec = "tf32" if dtype == torch.float32 else "ieee"
    strides = dict(DOT_PRECISION=prec, DOT_UPCAST=False, stride_id=1, stride_td=1, stride_sd=1, stride_ud=1)
    fwd = dict(HAS_ROW=True, HAS_COL=True, EVEN_D=True, EVEN_TD=True, **strides)
    bwd = dict(fwd, TEACHER=True)
    ints_fwd = frozenset({"M", "K", "D", "TD", "stride_im", "stride_tk", "stride_sm", "stride_uk"})
    ints_bwd = frozenset({"row0", "col0", "R", "C", "D", "TD", "stride_im", "stride_tk", "stride_sm",
                          "stride_uk", "stride_wr"})
    feats = (("img_ptr", feat), ("txt_ptr", feat), ("timg_ptr", feat), ("ttxt_ptr", feat))
    f64 = (("d_scale_ptr", "*fp64"), ("d_tscale_ptr", "*fp64"))
    coefs = frozenset({"coef_row", "coef_col"})
    for name, ce in (("forward", fwd),
                     ("forward row-only odd-D", dict(fwd, HAS_COL=False, EVEN_D=False, EVEN_TD=False))):
        yield _config.AotVariant("distill", name, _distill_forward_kernel, tile, ce, ints=ints_fwd,
                                 div16=ints_fwd, pointers=feats)
    for name, ce in (("backward", bwd), ("backward frozen-teacher", dict(bwd, TEACHER=False)),
                     ("backward column-only odd-D", dict(bwd, HAS_ROW=False, EVEN_D=False, EVEN_TD=False))):
        yield _config.AotVariant("distill", name, _distill_backward_kernel, tile, ce, ints=ints_bwd,
                                 div16=ints_bwd, floats=coefs, pointers=feats + f64)
