"""Backward: d_img, d_txt, d_scale from ONE recompute of each tile of S.

With P_row = exp(S - lse_row[:, None]) and P_col = exp(S - lse_col[None, :]):
    G       = coef_row * P_row + coef_col * P_col - coef_diag * I
    d_img   = s * G @ txt,   d_txt = s * G.T @ img,   d_scale = sum_ij G_ij <img_i, txt_j>

Why not a fully fused kernel: D is 512..1024 for CLIP, so a BM x D fp32 accumulator
for d_img (or d_txt) does not fit in registers, and fusing both outputs into the tile
kernel would mean either atomics on N x D fp32 (one per tile per output element) or
recomputing each tile once per output (what Inf-CL and flash-attention's two backward
kernels do).  Instead, in blocks of R rows x C columns of S (R * C * itemsize bounded
by CLIP_FAST_WORKSPACE_MB, default 256 MiB; blocks as square as the budget allows so
both GEMMs below stay compute-bound):
1. a Triton kernel recomputes each BM x BN tile once, forms G, reduces d_scale
   (per-row float64 partials, relaxed atomics), and writes G * gscale into the workspace
   in the input dtype (gscale: a power of two putting |G| <= 1, so fp16 keeps range);
2. cuBLAS: d_img[rows] += ws @ txt[cols] and d_txt[cols] += ws.T @ img[rows], with
   fp32 accumulation and fp32 output, scaled by s / gscale at the end.
Total work: one tile recompute plus the two unavoidable gradient GEMMs.

Exactness (docs/numerics.md, section 4): the tile shape is the forward's, so S2 is the
forward's bit for bit; each lse arrives as a float-float pair (hi, lo) and
P = 2^((S2 - hi) - lo); G's diagonal can come precomputed from the forward's float64
loss terms (``g_diag``); d_scale is reduced in float64.

Sharing one exponential between the two softmaxes (docs/numerics.md, section 5):
P_row and P_col differ only by per-row and per-column factors, so with ``hi`` the
largest lse of the tile, G = 2^(S2 - hi) * (coef_row u_i + coef_col v_j) needs one exp
per element.  ``shared_exp_g`` takes that path on the tiles whose lse spread keeps the
extra rounding within the precision budget, the two-exp path elsewhere; the
``share_exp`` variants switch it on (``config.Configs.share_exp``).
The ``fused`` backward (``config.Configs.backward_kind``, kernels/fused_backward.py)
forms the same G and keeps it on chip.  The ``tma_persistent`` variant runs this kernel on a
persistent grid (``config.Configs.persistent``) with its tiles loaded through tensor
descriptors (``Configs.backward_tma``); the tile's arithmetic is the same function, ``_grad_tile``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import config as _config
from .fused_backward import fused_grad_backward
from .lse_forward import _num_sms, launch_options, share_budget, use_tma
from .tile import block_descriptors, grouped_tile, shared_exp_g, tile_dot, tile_dot_desc, two_exp_g
from .workspace import block_shape, mm_f32

# log2(e) as a compile-time constant for the kernels (exp(x) = exp2(x * log2 e)).
_LOG2E_K = tl.constexpr(1.4426950408889634)


# One tile's work, longer than a screen on purpose: the recompute, G and its two reductions
# are one tile's epilogue, read top to bottom in the module doc's numbered steps.  Inlined into
# ``_grad_tile_kernel`` once (one tile per program) or inside its persistent loop.
@triton.jit
def _grad_tile(
    pid_m, pid_n, img_ptr, txt_ptr, img_desc, txt_desc, scale_ptr, bias_ptr, lse_row_ptr,
    lse_row_lo_ptr, lse_col_ptr, lse_col_lo_ptr, g_diag_ptr, ws_ptr, d_scale_ptr, d_scale_rest_ptr,
    row0, col0, R, C, D,
    stride_im, stride_id, stride_tk, stride_td, stride_wr, stride_wc,
    coef_row, coef_col, coef_diag, gscale,
    HAS_BIAS: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
    HAS_DIAG: tl.constexpr, G_DIAG: tl.constexpr, SHARE_EXP: tl.constexpr, SPLIT_SCALE: tl.constexpr,
    SHARE_BUDGET: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    offs_r = pid_m * BM + tl.arange(0, BM)      # row inside the workspace block
    offs_c = pid_n * BN + tl.arange(0, BN)      # column inside the workspace block
    row_ok = offs_r < R
    col_ok = offs_c < C
    offs_m = row0 + offs_r                      # global row of S
    offs_n = col0 + offs_c                      # global column of S
    img_rows = img_ptr + offs_m.to(tl.int64)[:, None] * stride_im
    txt_cols = txt_ptr + offs_n.to(tl.int64)[None, :] * stride_tk

    # 1. Recompute the tile acc = img_blk @ txt_blk.T (masked loads read 0 outside; the
    #    descriptors end at the block's last row and column, and pad with 0 past them).
    if USE_TMA:
        acc = tile_dot_desc(img_desc, txt_desc, row0 + pid_m * BM, col0 + pid_n * BN, D,
                            DOT_PRECISION, DOT_UPCAST, BM, BN, BK)
    else:
        acc = tile_dot(img_rows, txt_cols, row_ok, col_ok, D, stride_id, stride_td,
                       EVEN_D, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)

    # 2. S in log2 units (the scalars loaded after the MMA loop: fewer live registers in it).
    scale2 = tl.load(scale_ptr).to(tl.float32) * _LOG2E_K
    if HAS_BIAS:
        bias2 = tl.load(bias_ptr).to(tl.float32) * _LOG2E_K
    else:
        bias2 = 0.0
    s2 = acc * scale2 + bias2

    # 3. G = coef_row * P_row + coef_col * P_col (padded rows/cols: lse reads 0, masked below).
    #    Each lse arrives as a float-float pair in log2 units, lse2 = hi + lo with hi its
    #    float32 rounding (split on the host from the float64 lse).  P = 2^((S2 - hi) - lo):
    #    S2 - hi is exact near the top of a row (Sterbenz), so a dominant entry gets
    #    P = 2^-(small lo) to full precision, as a materialised softmax gives it, instead of
    #    2^(rounding of lse2 to float32).
    g = tl.zeros((BM, BN), tl.float32)
    if HAS_ROW:
        r_hi = tl.load(lse_row_ptr + offs_m, mask=row_ok, other=0.0)
        r_lo = tl.load(lse_row_lo_ptr + offs_m, mask=row_ok, other=0.0)
    if HAS_COL:
        c_hi = tl.load(lse_col_ptr + offs_n, mask=col_ok, other=0.0)
        c_lo = tl.load(lse_col_lo_ptr + offs_n, mask=col_ok, other=0.0)
    if SHARE_EXP:
        g = shared_exp_g(s2, r_hi, r_lo, c_hi, c_lo, row_ok, col_ok, coef_row, coef_col, SHARE_BUDGET)
    else:
        if HAS_ROW:
            g += coef_row * tl.exp2((s2 - r_hi[:, None]) - r_lo[:, None])
        if SPLIT_SCALE:
            # d_scale's row-term share, reduced per row while g holds only the row term
            # (never with SHARE_EXP: the launcher turns sharing off); a diagonal taken
            # from g_diag belongs to the rest.
            g_row = g
            if G_DIAG:
                g_row = tl.where(offs_m[:, None] == offs_n[None, :], 0.0, g_row)
            ds_row = tl.sum(tl.where(row_ok[:, None] & col_ok[None, :], g_row, 0.0) * acc, axis=1)
        if HAS_COL:
            g += coef_col * tl.exp2((s2 - c_hi[None, :]) - c_lo[None, :])
    if G_DIAG:
        # The diagonal from the forward's float64 loss terms (precomputed on the host):
        # on a confident row coef * (P_ii - 1) cancels, and this tile's S_ii need not
        # match the forward's to the last bit.
        eq = offs_m[:, None] == offs_n[None, :]
        g_ii = tl.load(g_diag_ptr + offs_m, mask=row_ok & (offs_m < col0 + C), other=0.0)
        g = tl.where(eq, g_ii[:, None], g)
    elif HAS_DIAG:
        g = tl.where(offs_m[:, None] == offs_n[None, :], g - coef_diag, g)
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)

    # 4. d_scale partials: sum_j G_ij * <img_i, txt_j>, summed over the tile in fp32 and
    #    across tiles in one float64 cell per row (millions of terms per row otherwise).
    #    SPLIT_SCALE: the row term's share in d_scale_ptr, the rest (column term and
    #    diagonal) in d_scale_rest_ptr.
    ds = tl.sum(g * acc, axis=1)
    if SPLIT_SCALE:
        tl.atomic_add(d_scale_ptr + offs_m, ds_row.to(tl.float64), mask=row_ok, sem="relaxed")
        tl.atomic_add(d_scale_rest_ptr + offs_m, (ds - ds_row).to(tl.float64), mask=row_ok,
                      sem="relaxed")
    else:
        tl.atomic_add(d_scale_ptr + offs_m, ds.to(tl.float64), mask=row_ok, sem="relaxed")
    # 5. G (scaled into [-1, 1]) into the workspace, in the workspace's dtype.
    ws = ws_ptr + offs_r.to(tl.int64)[:, None] * stride_wr + offs_c[None, :] * stride_wc
    tl.store(ws, (g * gscale).to(ws_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grad_tile_kernel(
    img_ptr, txt_ptr, scale_ptr, bias_ptr, lse_row_ptr, lse_row_lo_ptr, lse_col_ptr,
    lse_col_lo_ptr, g_diag_ptr,
    ws_ptr, d_scale_ptr, d_scale_rest_ptr,
    row0, col0, R, C, D, num_programs,
    stride_im, stride_id, stride_tk, stride_td, stride_wr, stride_wc,
    coef_row, coef_col, coef_diag, gscale,
    HAS_BIAS: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
    HAS_DIAG: tl.constexpr, G_DIAG: tl.constexpr, SHARE_EXP: tl.constexpr, SPLIT_SCALE: tl.constexpr,
    SHARE_BUDGET: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr, PERSISTENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Tensor descriptors (USE_TMA: TMA loads on sm_90) ending at this workspace block's last row
    # of img and of txt, made once per program.
    img_desc, txt_desc = block_descriptors(img_ptr, txt_ptr, row0 + R, col0 + C, D, stride_im, stride_tk,
                                           USE_TMA, BM, BN, BK)
    num_pm = tl.cdiv(R, BM)
    num_pn = tl.cdiv(C, BN)
    if PERSISTENT:
        # num_programs programs walk the block's tiles with that stride, in the grouped order.
        # flatten: this loop and the D loop inside it are one loop to the software pipeliner,
        # so the next tile's first loads are issued during this tile's epilogue (sm_90: one
        # more stage of operand buffers, 32 KiB, in aot_check's shared-memory figure).
        for t in tl.range(tl.program_id(0), num_pm * num_pn, num_programs, flatten=True):
            pid_m, pid_n = grouped_tile(t, num_pm, num_pn, GROUP_M)
            _grad_tile(pid_m, pid_n, img_ptr, txt_ptr, img_desc, txt_desc, scale_ptr, bias_ptr,
                       lse_row_ptr, lse_row_lo_ptr, lse_col_ptr, lse_col_lo_ptr, g_diag_ptr, ws_ptr,
                       d_scale_ptr, d_scale_rest_ptr, row0, col0, R, C, D, stride_im, stride_id, stride_tk,
                       stride_td, stride_wr, stride_wc, coef_row, coef_col, coef_diag, gscale,
                       HAS_BIAS, HAS_ROW, HAS_COL, HAS_DIAG, G_DIAG, SHARE_EXP, SPLIT_SCALE, SHARE_BUDGET,
                       EVEN_D, USE_TMA, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)
    else:
        # Grouped tile order (as in Triton's matmul tutorial) so neighbouring programs
        # share txt blocks in L2.
        pid_m, pid_n = grouped_tile(tl.program_id(0), num_pm, num_pn, GROUP_M)
        _grad_tile(pid_m, pid_n, img_ptr, txt_ptr, img_desc, txt_desc, scale_ptr, bias_ptr,
                   lse_row_ptr, lse_row_lo_ptr, lse_col_ptr, lse_col_lo_ptr, g_diag_ptr, ws_ptr,
                   d_scale_ptr, d_scale_rest_ptr, row0, col0, R, C, D, stride_im, stride_id, stride_tk,
                   stride_td, stride_wr, stride_wc, coef_row, coef_col, coef_diag, gscale,
                   HAS_BIAS, HAS_ROW, HAS_COL, HAS_DIAG, G_DIAG, SHARE_EXP, SPLIT_SCALE, SHARE_BUDGET,
                   EVEN_D, USE_TMA, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)


_autotuned = None


def _kernel(autotune: bool):
    global _autotuned
    if not autotune:
        return _grad_tile_kernel
    if _autotuned is None:
        _autotuned = triton.autotune(
            configs=_config.autotune_candidates("backward"),
            key=["R", "C", "D"],
            restore_value=["d_scale_ptr", "d_scale_rest_ptr"],   # accumulated across blocks: undo trial runs
        )(_grad_tile_kernel)
    return _autotuned


def _kernel_flags(cfg, dtype, has_bias: bool, coef_row, coef_col, coef_diag, gscale, has_g_diag: bool,
                  split_scale: bool, tma: bool) -> dict:
    """The kernel arguments that are the same for every workspace block of one call."""
    has_row, has_col = coef_row != 0.0, coef_col != 0.0
    return dict(
        coef_row=float(coef_row), coef_col=float(coef_col),
        coef_diag=float(coef_diag), gscale=float(gscale),
        HAS_BIAS=has_bias, HAS_ROW=has_row, HAS_COL=has_col,
        HAS_DIAG=coef_diag != 0.0, G_DIAG=has_g_diag,
        SHARE_EXP=bool(cfg.share_exp) and has_row and has_col and not split_scale,
        SPLIT_SCALE=bool(split_scale), SHARE_BUDGET=share_budget(dtype), USE_TMA=bool(tma),
        DOT_PRECISION=_config.dot_precision(dtype),
        DOT_UPCAST=_config.interpreter_active() and dtype == torch.bfloat16,
        GROUP_M=8,
    )


def _launch_block(kernel, bwd, ptrs, args: dict, options: dict, max_programs: int) -> None:
    """One workspace block's launch: the configured tile shape ``bwd``, or (None) the
    autotuner's choice; ``options``: the variant's compile options (``launch_options``);
    ``max_programs`` > 0: a persistent grid of at most that many programs."""
    r, c, D = args["R"], args["C"], args["D"]
    if bwd is None:
        grid = lambda meta: (triton.cdiv(r, meta["BM"]) * triton.cdiv(c, meta["BN"]),)  # noqa: E731
        kernel[grid](*ptrs, **args, num_programs=1, PERSISTENT=False, EVEN_D=False)
    else:
        tiles = triton.cdiv(r, bwd.BM) * triton.cdiv(c, bwd.BN)
        programs = min(tiles, max_programs)
        kernel[(programs or tiles,)](*ptrs, **args, num_programs=max(programs, 1), PERSISTENT=programs > 0,
                                     EVEN_D=D % bwd.BK == 0, BM=bwd.BM, BN=bwd.BN, BK=bwd.BK,
                                     num_warps=bwd.num_warps, num_stages=bwd.num_stages, **options)


def _grad_backward_impl(img, txt, scale, bias, lse_row, lse_col,
                        coef_row: float, coef_col: float, coef_diag: float, g_diag=None,
                        split_scale: bool = False):
    M, D = img.shape
    K = txt.shape[0]
    dev = img.device
    f32 = torch.float32
    d_img = torch.zeros((M, D), device=dev, dtype=f32)
    d_txt = torch.zeros((K, D), device=dev, dtype=f32)
    # Per-row float64 d_scale cells: one column, or two (row term, rest) with split_scale.
    d_scale_rows = torch.zeros((2 if split_scale else 1, M), device=dev, dtype=torch.float64)

    def scale_out():
        return d_scale_rows.sum(dim=1).to(f32) if split_scale else d_scale_rows.sum().to(f32)

    has_row = coef_row != 0.0
    has_col = coef_col != 0.0
    if M == 0 or K == 0 or D == 0 or not (has_row or has_col or coef_diag != 0.0):
        return d_img, d_txt, scale_out()
    if has_row and lse_row is None:
        raise ValueError("grad_backward: coef_row != 0 needs lse_row, got None")
    if has_col and lse_col is None:
        raise ValueError("grad_backward: coef_col != 0 needs lse_col, got None")

    cfg = _config.get_configs(dev, img.dtype)
    bwd = cfg.backward
    autotune = _config.autotune_enabled()
    # gscale: a power of two with |G * gscale| <= 1 (fp16 range; exact for any dtype).
    gmax = max(abs(coef_row) + abs(coef_col), abs(coef_diag))
    gscale = 2.0 ** math.floor(-math.log2(gmax))
    ws_dtype = img.dtype
    R, C = block_shape(M, K, img.element_size(), 256 if autotune else bwd.BM,
                        256 if autotune else bwd.BN)
    ws = torch.empty((R, C), device=dev, dtype=ws_dtype)
    dummy = d_img
    lse_row_t = lse_row.contiguous() if has_row else dummy.new_zeros((2, 1))
    lse_col_t = lse_col.contiguous() if has_col else dummy.new_zeros((2, 1))
    g_diag_t = g_diag.to(f32).contiguous() if g_diag is not None else dummy
    kernel = _kernel(autotune)
    flags = _kernel_flags(cfg, img.dtype, bias is not None, coef_row, coef_col, coef_diag, gscale,
                          g_diag is not None, split_scale,
                          tma=bool(cfg.backward_tma) and not autotune and use_tma(cfg, img, txt))
    # A persistent grid (config.Configs.persistent programs per SM), with the descriptor loads
    # only: the compiled and tested pairing (aot_variants).
    max_programs = cfg.persistent * _num_sms(dev) if flags["USE_TMA"] else 0
    for r0 in range(0, M, R):
        r = min(R, M - r0)
        for c0 in range(0, K, C):
            c = min(C, K - c0)
            block = ws[:r, :c]
            ptrs = (img, txt, scale, bias if bias is not None else scale,
                    lse_row_t[0], lse_row_t[1], lse_col_t[0], lse_col_t[1], g_diag_t, block,
                    d_scale_rows[0], d_scale_rows[-1])
            _launch_block(kernel, None if autotune else bwd, ptrs, dict(
                flags, row0=r0, col0=c0, R=r, C=c, D=D,
                stride_im=img.stride(0), stride_id=img.stride(1),
                stride_tk=txt.stride(0), stride_td=txt.stride(1),
                stride_wr=block.stride(0), stride_wc=block.stride(1)), launch_options(cfg), max_programs)
            # cuBLAS: both gradient GEMMs from the same workspace block.
            d_img[r0:r0 + r].add_(mm_f32(block, txt[c0:c0 + c]))
            d_txt[c0:c0 + c].add_(mm_f32(block.t(), img[r0:r0 + r]))
    factor = scale.to(f32) / gscale
    d_img.mul_(factor)
    d_txt.mul_(factor)
    return d_img, d_txt, scale_out()


# The backward is a custom_op (opaque to torch.compile, with a fake implementation),
# not a triton_op: its block loop runs (M/R) * (K/C) iterations, which tracing through
# would unroll into a graph whose size grows as N^2 / workspace.  The forward, a fixed
# handful of launches, is a triton_op that compile sees through.
@torch.library.custom_op("clip_fast::triton_grad_backward", mutates_args=())
def triton_grad_backward(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                         bias: Optional[torch.Tensor], lse_row: Optional[torch.Tensor],
                         lse_col: Optional[torch.Tensor], coef_row: float, coef_col: float,
                         coef_diag: float, g_diag: Optional[torch.Tensor] = None,
                         split_scale: bool = False
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The "fused" design (config.Configs.backward_kind) keeps G on chip; the ring's
    # split d_scale and the empty sweeps stay on the workspace path.
    nonempty = min(img.shape[0], txt.shape[0], img.shape[1]) > 0 and (
        coef_row != 0.0 or coef_col != 0.0 or coef_diag != 0.0)
    if (nonempty and not split_scale
            and _config.get_configs(img.device, img.dtype).backward_kind == "fused"):
        return fused_grad_backward(img, txt, scale, bias, lse_row, lse_col,
                                   coef_row, coef_col, coef_diag, g_diag)
    return _grad_backward_impl(img, txt, scale, bias, lse_row, lse_col,
                               coef_row, coef_col, coef_diag, g_diag, split_scale)


@triton_grad_backward.register_fake
def _(img, txt, scale, bias, lse_row, lse_col, coef_row, coef_col, coef_diag, g_diag=None,
      split_scale=False):
    f32 = torch.float32
    return (img.new_empty(img.shape, dtype=f32), txt.new_empty(txt.shape, dtype=f32),
            scale.new_empty((2,) if split_scale else (), dtype=f32))


def grad_backward(img, txt, scale, bias, lse_row, lse_col, coef_row, coef_col, coef_diag,
                  g_diag=None, split_scale=False):
    """(d_img, d_txt, d_scale) for G = coef_row P_row + coef_col P_col - coef_diag I.

    ``g_diag`` (min(M, K),), when given, replaces G's diagonal (``clip_fast.core.numerics.diag_grad``).
    ``split_scale``: d_scale as (2,), [the row term's share off that diagonal, the rest].
    """
    return torch.ops.clip_fast.triton_grad_backward(
        img, txt, scale, bias, lse_row, lse_col,
        float(coef_row), float(coef_col), float(coef_diag), g_diag, bool(split_scale))


def aot_variants(dtype: torch.dtype, arch: int):
    """The compile variants of ``_grad_tile_kernel`` (``python -m clip_fast.kernels.aot_check``)."""
    prec = "tf32" if dtype == torch.float32 else "ieee"
    base = dict(HAS_BIAS=False, HAS_ROW=True, HAS_COL=True, HAS_DIAG=True, G_DIAG=True,
                SHARE_EXP=False, SPLIT_SCALE=False, SHARE_BUDGET=share_budget(dtype), EVEN_D=True,
                USE_TMA=False, PERSISTENT=False, DOT_PRECISION=prec, DOT_UPCAST=False,
                GROUP_M=8, stride_id=1, stride_td=1, stride_wc=1)
    variants = [("tile", base),
                ("tile coef-diag bias odd-D", dict(base, G_DIAG=False, HAS_BIAS=True, EVEN_D=False)),
                ("tile shared-exp", dict(base, SHARE_EXP=True)),
                ("tile row-only", dict(base, HAS_COL=False)),
                # The ring's off-diagonal blocks: d_scale split into the row term and the rest.
                ("tile split-scale", dict(base, HAS_DIAG=False, G_DIAG=False, SPLIT_SCALE=True))]
    feat = _config.feature_ptr(dtype)
    ints = frozenset({"row0", "col0", "R", "C", "D", "num_programs", "stride_im", "stride_tk", "stride_wr"})
    table = _config.table_configs(arch // 10, dtype).backward
    tiles = {name: table for name, _ in variants}
    options = {}
    # "regs128" (config.VARIANTS): its tile, ptxas capped at 128 registers for two CTAs per SM.
    regs = _config.VARIANT_TILES["regs128"]
    variants.append(("tile regs128", base))
    tiles["tile regs128"] = _config.KernelConfig(regs.BM, regs.BN, min(regs.BK, table.BK),
                                                 regs.num_warps, regs.num_stages)
    options["tile regs128"] = (("maxnreg", _config.VARIANTS["regs128"]["maxnreg"]),)
    if arch >= 90:   # "tma_persistent" (config.VARIANTS): descriptors, a persistent grid
        variants.append(("tile tma persistent", dict(base, USE_TMA=True, PERSISTENT=True)))
        tiles["tile tma persistent"] = table
    for name, ce in variants:
        yield _config.AotVariant(
            "backward", name, _grad_tile_kernel, tiles[name], ce,
            ints=ints, div16=ints - {"num_programs"}, floats=frozenset({"coef_row", "coef_col", "coef_diag", "gscale"}),
            pointers=(("img_ptr", feat), ("txt_ptr", feat), ("ws_ptr", feat),
                      ("d_scale_ptr", "*fp64"), ("d_scale_rest_ptr", "*fp64")),
            options=options.get(name, ()))
