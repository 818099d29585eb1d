"""SigLIP: the sigmoid loss and all its gradients from ONE sweep over the tiles of S.

The contract and the numerics are on one page, ``clip_fast.siglip.backends``; the
steps below cite its numbered numerics.  Per tile of S = s * img @ txt.T + b:

1. ``acc = img_blk @ txt_blk.T`` in fp32 (loop over D in BK slices, ``tile_dot``);
2. ``S = fma(acc, s, b)`` and the labels: x = -z S, with z = +1 on the diagonal
   (LABELS == 1) or where the group ids match (LABELS == 2);
3. the loss terms softplus(x) = max(x, 0) + log1p(2^-(|x| log2 e)) (numerics 2), the
   tiny ones into a second row sum scaled by 2^96 (numerics 3);
4. G = -z sigmoid(x) (numerics 4), and its row sums sum_j G_ij and sum_j G_ij acc_ij
   (the d_bias and d_scale partials);
5. the four row sums added into float64 cells, one per row (relaxed atomics: a row's
   tiles come from different programs), so every N^2-term reduction is float64 past
   the tile (numerics 5);
6. G (in [-1, 1]) stored into a bounded workspace block in the input dtype; cuBLAS then
   adds ``ws @ txt_blk`` to d_img and ``ws.T @ img_blk`` to d_txt, fp32 accumulation.

Why the gradients are formed here, in the forward, rather than recomputed in a backward:
with no normaliser, G_ij depends on S_ij alone, so the tile that gives the loss terms
gives G too.  Saving d_img and d_txt (O(N*D) float32, the size of the inputs) costs the
6 N^2 D floor of flops once: S, then G @ txt and G.T @ img.  Recomputing in the backward
would pay S's 2 N^2 D a second time (a third more work) to save memory that is not the
bottleneck.  ``need_grad=False`` (evaluation, no_grad) skips steps 4 and 6: a loss-only
sweep of 2 N^2 D flops and no workspace.

Why a workspace and cuBLAS rather than d_img accumulated in registers: a program that owns
a row block would hold a (BM, D) fp32 accumulator (D = 512: too many registers at useful
BM) and d_txt would need (K, D) fp32 atomics, which are slow and not deterministic.  The
workspace is bounded (``CLIP_FAST_WORKSPACE_MB``, default 256 MiB) and the GEMMs run at
cuBLAS speed; the price is one write and two reads of each G block.

Variants (``config.SIGLIP_VARIANTS``, selected like the CLIP ones; docs/gpu_variants.md):
* "default": the above.
* "tma": step 1 through tensor descriptors (TMA loads on sm_90) over rows [0, row0 + R) of img
  and [0, col0 + C) of txt, whose zero padding past the block and past D gives the masked
  loads' zeros; the grouped tile order above is kept, one program per tile.
* "tma_persistent": "tma" on a persistent grid (``SiglipDesign.persistent`` programs per SM, never
  more than a workspace block's tiles): each program walks the block's tiles with that stride
  in the grouped order, its D loop and tile loop flattened into one software-pipelined loop.
  The tile's steps 1-6 are one function, ``_siglip_tile``, for both launches.  Without the
  descriptor loads (sm_80, rows not 16-byte aligned) it runs as "default".
* "fused_bwd": G never reaches device memory.  ``_siglip_fused_kernel`` is launched twice: a
  program owns BM rows (d_img, the four row sums in float64 registers, no atomics) or BN
  columns (d_txt) and DV of the D output features, sweeps the other dimension, recomputes
  each tile (steps 1-4, the same ``_siglip_terms``), rounds G to the input dtype (the value
  the workspace would hold) and accumulates ``G_q @ txt_blk[:, dv]`` (``G_q.T @ img_blk[:, dv]``)
  in fp32 registers.  That answers the objection above by splitting D in DV chunks
  (``fused_backward.feature_chunk``: 256 on sm_90 for 2-byte inputs) and d_txt by its own
  launch; the price is the recompute: per launch D/DV tile sweeps of 2 N^2 (D + DV) flops
  (12 N^2 D in all at DV = D/2, against 6 N^2 D plus G's write and two reads).  Whether the
  saved memory traffic pays for it is the GPU check's question
  (benchmarks/results/kernel_prediction_sm90_2026-12-04.md predicts it).
Exponent sharing, CLIP's third variant, has no counterpart: there is no softmax, and each
element already takes one exp2.

Matryoshka sizes (``nested_siglip_block``, ``_nested_siglip_tile_kernel``): the weighted sum
of the loss at every prefix size d_1 < ... < d_n in one sweep.  The K loop of step 1 runs
through the size boundaries; as the running sum passes d_q, size q's epilogue (steps 2-5 on
S_q = (acc * rs_q) * c_q + b with the prefix scalings, numerics unchanged) and its
H_q = r_q G_q c_q into its own fp32 workspace block.  The host then sums the H from the largest
size down, so ``ws_sum @ txt[:, seg_j]`` multiplies each segment once, and applies each size's
normalisation chain (``clip_fast.core.matryoshka``) from the per-row and per-column sums the
kernel leaves.  Rejected: one workspace holding the running prefix sum of the H (the suffix
sums would be total minus prefix, cancelling on the small sizes); the sizes' H summed in
registers (n tiles of fp32 live at once).  The workspace budget is shared by the n blocks.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import config as _config
from .workspace import block_shape, mm_f32
from .fused_backward import dv_cap, feature_chunk
from .lse_forward import _num_sms, use_tma
from .tile import block_descriptors, block_tile, grouped_tile, tile_dot, tile_dot_desc, tile_dot_range
from ..core.matryoshka import NestedOptions, chains, scalings
from ..core.numerics import TINY_SHIFT, siglip_block_meta

# log2(e) as a float32 pair (hi + lo), hi split again in 12-bit halves (hh + hl), and ln 2.
_LOG2E_HI = tl.constexpr(1.4426950216293335)
_LOG2E_HH = tl.constexpr(1.4423828125)
_LOG2E_HL = tl.constexpr(0.00031220912933349609)
_LOG2E_LO = tl.constexpr(1.925963001510248e-08)
_LN2_K = tl.constexpr(0.6931471805599453)


@triton.jit
def _sigmoid_terms(s_ij, offs_m, offs_n, row_ok, col_ok, ok, ids_row_ptr, ids_col_ptr, LABELS: tl.constexpr):
    """Steps 2-3 on one tile of S (global rows offs_m, columns offs_n): (x, pos, e, u) for
    ``_sigmoid_grad``, the loss terms and the tiny terms (scaled by 2^96), 0 outside the block
    (pos, the positive pairs, is all False for LABELS == 0)."""
    # 2. x = -z S (z = -1: x = S; z = +1: x = -S).
    if LABELS == 1:
        pos = offs_m[:, None] == offs_n[None, :]
        x = tl.where(pos, -s_ij, s_ij)
    elif LABELS == 2:
        # Padded rows and columns read different sentinels, so they are never "equal".
        id_r = tl.load(ids_row_ptr + offs_m, mask=row_ok, other=-1)
        id_c = tl.load(ids_col_ptr + offs_n, mask=col_ok, other=-2)
        pos = id_r[:, None] == id_c[None, :]
        x = tl.where(pos, -s_ij, s_ij)
    else:
        pos = offs_m[:, None] < 0
        x = s_ij

    # 3. e = exp(-|x|) as an exp2: y = |x| log2 e carried as y + y_lo (log2 e split in
    #    two float32 parts, the product's error recovered exactly), e = 2^-y (1 - y_lo ln 2).
    #    A single float32 y would carry |S| 2^-24 of error into e's exponent, a relative
    #    error of 5e-6 at |S| = 90, above the rounding of S itself.
    #    eb = e 2^96 stays normal down to |S| ~ 154.  One exp2 per element: of 96 - y
    #    where y >= 48 (exact subtraction, Sterbenz), else of -y (96 - y would round y's
    #    low bits away); the other by an exact power-of-two scaling.
    #    softplus(x) = max(x, 0) + log1p(e), log1p(e) = ln 2 log2(u) e / (u - 1) with
    #    u = 1 + e (log1p-accurate); where u rounds to 1, log1p(e) = e, summed as eb in
    #    the tiny row sum (the host multiplies it by 2^-96).
    #    (96 is clip_fast.siglip.backends.TINY_SHIFT, which the host's 2^-96 matches.)
    a = tl.abs(x)
    y = a * _LOG2E_HI
    # The rounding error of a * LOG2E_HI by Dekker's product (no fma: the interpreter's
    # fma rounds the product first): a and LOG2E_HI split into 12-bit halves.
    a_big = a * 4097.0
    a_hi = a_big - (a_big - a)
    a_lo = a - a_hi
    y_err = ((a_hi * _LOG2E_HH - y) + a_hi * _LOG2E_HL + a_lo * _LOG2E_HH) + a_lo * _LOG2E_HL
    y_lo = y_err + a * _LOG2E_LO
    far = y >= 48.0
    t = tl.exp2(tl.where(far, 96.0 - y, -y)) * (1.0 - y_lo * _LN2_K)
    e = tl.where(far, t * 1.262177448353619e-29, t)   # 2^-96
    eb = tl.where(far, t, tl.where(far, 0.0, t) * 7.922816251426434e+28)  # 2^96 (no inf lanes)
    u = 1.0 + e
    small = u == 1.0
    l1p = tl.where(small, 0.0, (tl.log2(u) * _LN2_K) * (e / tl.where(small, 1.0, u - 1.0)))
    term = tl.where(ok, tl.maximum(x, 0.0) + l1p, 0.0)
    tiny = tl.where(ok & small, eb, 0.0)
    return x, pos, e, u, term, tiny


@triton.jit
def _sigmoid_grad(x, pos, e, u, ok, LABELS: tl.constexpr):
    """Step 4 from ``_sigmoid_terms``: G = -z sigmoid(x), with sigmoid(x) = 1 / u for x >= 0
    and e / u for x < 0; 0 outside the block."""
    sig = tl.where(x >= 0.0, 1.0 / u, e / u)
    if LABELS == 0:
        g = sig
    else:
        g = tl.where(pos, -sig, sig)
    return tl.where(ok, g, 0.0)


@triton.jit
def _siglip_terms(acc, scale_ptr, bias_ptr, ids_row_ptr, ids_col_ptr, offs_m, offs_n, row_ok, col_ok,
                  HAS_BIAS: tl.constexpr, LABELS: tl.constexpr):
    """Steps 2-4 for one tile of acc = img_blk @ txt_blk.T: (loss terms, tiny terms, G), each zero
    outside the valid entries.  One function for the workspace kernel and the fused one, so both
    form the same G (a caller that does not use G leaves it to dead-code elimination)."""
    ok = row_ok[:, None] & col_ok[None, :]
    # 2. S = acc * s + b (one rounding).
    scale = tl.load(scale_ptr).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    else:
        bias = 0.0
    s_ij = tl.fma(acc, scale, bias)
    x, pos, e, u, term, tiny = _sigmoid_terms(s_ij, offs_m, offs_n, row_ok, col_ok, ok, ids_row_ptr,
                                              ids_col_ptr, LABELS)
    return term, tiny, _sigmoid_grad(x, pos, e, u, ok, LABELS)


# One tile's work (steps 1-6), inlined into ``_siglip_tile_kernel`` once (one tile per program)
# or inside its persistent loop ("tma_persistent"): both launches run the same arithmetic.
@triton.jit
def _siglip_tile(
    pid_m, pid_n, img_ptr, txt_ptr, img_desc, txt_desc, scale_ptr, bias_ptr, ids_row_ptr, ids_col_ptr,
    ws_ptr, loss_ptr, tiny_ptr, d_scale_ptr, d_bias_ptr,
    row0, col0, R, C, D,
    stride_im, stride_id, stride_tk, stride_td, stride_wr, stride_wc,
    HAS_BIAS: tl.constexpr, LABELS: tl.constexpr, NEED_GRAD: tl.constexpr, USE_TMA: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    offs_r = pid_m * BM + tl.arange(0, BM)      # row inside the block
    offs_c = pid_n * BN + tl.arange(0, BN)      # column inside the block
    row_ok = offs_r < R
    col_ok = offs_c < C
    offs_m = row0 + offs_r                      # global row of S
    offs_n = col0 + offs_c                      # global column of S

    # 1. The tile acc = img_blk @ txt_blk.T.  Masked loads read 0 outside the block;
    #    those entries are zeroed out of every sum below by the valid-entry mask.
    if USE_TMA:
        acc = tile_dot_desc(img_desc, txt_desc, row0 + pid_m * BM, col0 + pid_n * BN, D,
                            DOT_PRECISION, DOT_UPCAST, BM, BN, BK)
    else:
        img_rows = img_ptr + offs_m.to(tl.int64)[:, None] * stride_im
        txt_cols = txt_ptr + offs_n.to(tl.int64)[None, :] * stride_tk
        acc = tile_dot(img_rows, txt_cols, row_ok, col_ok, D, stride_id, stride_td,
                       EVEN_D, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)

    # 2-4. Loss terms, tiny terms and G.
    term, tiny, g = _siglip_terms(acc, scale_ptr, bias_ptr, ids_row_ptr, ids_col_ptr, offs_m, offs_n,
                                  row_ok, col_ok, HAS_BIAS, LABELS)
    # 5. Row sums in fp32 over the tile, across tiles in float64.
    tl.atomic_add(loss_ptr + offs_m, tl.sum(term, axis=1).to(tl.float64), mask=row_ok, sem="relaxed")
    tl.atomic_add(tiny_ptr + offs_m, tl.sum(tiny, axis=1).to(tl.float64), mask=row_ok, sem="relaxed")

    if NEED_GRAD:
        tl.atomic_add(d_scale_ptr + offs_m, tl.sum(g * acc, axis=1).to(tl.float64), mask=row_ok,
                      sem="relaxed")
        tl.atomic_add(d_bias_ptr + offs_m, tl.sum(g, axis=1).to(tl.float64), mask=row_ok,
                      sem="relaxed")
        # 6. G into the workspace block, in the workspace's dtype.
        ws = ws_ptr + offs_r.to(tl.int64)[:, None] * stride_wr + offs_c[None, :] * stride_wc
        tl.store(ws, g.to(ws_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _siglip_tile_kernel(
    img_ptr, txt_ptr, scale_ptr, bias_ptr, ids_row_ptr, ids_col_ptr,
    ws_ptr, loss_ptr, tiny_ptr, d_scale_ptr, d_bias_ptr,
    row0, col0, R, C, D, num_programs,
    stride_im, stride_id, stride_tk, stride_td, stride_wr, stride_wc,
    HAS_BIAS: tl.constexpr, LABELS: tl.constexpr, NEED_GRAD: tl.constexpr, USE_TMA: tl.constexpr,
    PERSISTENT: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # LABELS: 0 every pair negative, 1 the diagonal positive, 2 equal ids positive.
    # The descriptors (USE_TMA) end at this workspace block's last row of img and of txt; made once
    # per program.
    img_desc, txt_desc = block_descriptors(img_ptr, txt_ptr, row0 + R, col0 + C, D, stride_im, stride_tk,
                                           USE_TMA, BM, BN, BK)
    if PERSISTENT:
        # num_programs programs walk the block's tiles with that stride, in the grouped order;
        # flatten: the tile loop and the D loop inside it are one loop to the software pipeliner
        # (the next tile's first loads issued during this tile's epilogue), as in the CLIP
        # backward's G kernel.
        num_pm = tl.cdiv(R, BM)
        num_pn = tl.cdiv(C, BN)
        for t in tl.range(tl.program_id(0), num_pm * num_pn, num_programs, flatten=True):
            pid_m, pid_n = grouped_tile(t, num_pm, num_pn, GROUP_M)
            _siglip_tile(pid_m, pid_n, img_ptr, txt_ptr, img_desc, txt_desc, scale_ptr, bias_ptr,
                         ids_row_ptr, ids_col_ptr, ws_ptr, loss_ptr, tiny_ptr, d_scale_ptr, d_bias_ptr,
                         row0, col0, R, C, D, stride_im, stride_id, stride_tk, stride_td, stride_wr, stride_wc,
                         HAS_BIAS, LABELS, NEED_GRAD, USE_TMA, EVEN_D, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)
    else:
        # Grouped tile order so neighbouring programs share txt blocks in L2.  The tile counts are
        # formed here, not above the branch: in this order ptxas gives the fp32 "negatives" tile
        # 3038 epilogue instructions, against 3423 the other way (aot_check --sass, sm_90).
        pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(R, BM), tl.cdiv(C, BN), GROUP_M)
        _siglip_tile(pid_m, pid_n, img_ptr, txt_ptr, img_desc, txt_desc, scale_ptr, bias_ptr,
                     ids_row_ptr, ids_col_ptr, ws_ptr, loss_ptr, tiny_ptr, d_scale_ptr, d_bias_ptr,
                     row0, col0, R, C, D, stride_im, stride_id, stride_tk, stride_td, stride_wr, stride_wc,
                     HAS_BIAS, LABELS, NEED_GRAD, USE_TMA, EVEN_D, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)


# One kernel body for both launches of the fused variant (module doc, "fused_bwd"): the sweep
# is the whole kernel, its two orientations side by side so that they visibly form the same G.
@triton.jit
def _siglip_fused_kernel(
    img_ptr, txt_ptr, scale_ptr, bias_ptr, ids_row_ptr, ids_col_ptr,
    out_ptr, loss_ptr, tiny_ptr, d_scale_ptr, d_bias_ptr,
    M, K, D, stride_im, stride_id, stride_tk, stride_td, stride_om,
    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, LABELS: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DV: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_v = pid_v * DV + tl.arange(0, DV)
    v_ok = offs_v < D
    q_ty = img_ptr.dtype.element_ty
    if TRANSPOSED:
        # d_txt[cols, dv] = sum over row tiles of G_q.T @ img[rows, dv].
        offs_n = pid_o * BN + tl.arange(0, BN)
        col_ok = offs_n < K
        txt_cols = txt_ptr + offs_n.to(tl.int64)[None, :] * stride_tk
        out = tl.zeros((BN, DV), tl.float32)
        for start_m in range(0, M, BM):
            offs_m = start_m + tl.arange(0, BM)
            row_ok = offs_m < M
            img_rows = img_ptr + offs_m.to(tl.int64)[:, None] * stride_im
            acc = tile_dot(img_rows, txt_cols, row_ok, col_ok, D, stride_id, stride_td,
                           EVEN_D, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)
            _term, _tiny, g = _siglip_terms(acc, scale_ptr, bias_ptr, ids_row_ptr, ids_col_ptr, offs_m,
                                            offs_n, row_ok, col_ok, HAS_BIAS, LABELS)
            # 6'. G rounded to the input dtype (the workspace's value), then its product in fp32.
            gq = g.to(q_ty)
            other = tl.load(img_rows + offs_v[None, :] * stride_id, mask=row_ok[:, None] & v_ok[None, :],
                            other=0.0)
            if DOT_UPCAST:
                gq = gq.to(tl.float32)
                other = other.to(tl.float32)
            out = tl.dot(tl.trans(gq), other, out, input_precision=DOT_PRECISION)
        offs_o = offs_n
        o_ok = col_ok
    else:
        # d_img[rows, dv] = sum over column tiles of G_q @ txt[cols, dv]; the row sums of steps
        # 3-5 in float64 registers (the program owns its rows: no atomics), stored by pid_v 0.
        offs_m = pid_o * BM + tl.arange(0, BM)
        row_ok = offs_m < M
        img_rows = img_ptr + offs_m.to(tl.int64)[:, None] * stride_im
        out = tl.zeros((BM, DV), tl.float32)
        loss_rows = tl.zeros((BM,), tl.float64)
        tiny_rows = tl.zeros((BM,), tl.float64)
        ds_rows = tl.zeros((BM,), tl.float64)
        db_rows = tl.zeros((BM,), tl.float64)
        for start_n in range(0, K, BN):
            offs_n = start_n + tl.arange(0, BN)
            col_ok = offs_n < K
            txt_cols = txt_ptr + offs_n.to(tl.int64)[None, :] * stride_tk
            acc = tile_dot(img_rows, txt_cols, row_ok, col_ok, D, stride_id, stride_td,
                           EVEN_D, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)
            term, tiny, g = _siglip_terms(acc, scale_ptr, bias_ptr, ids_row_ptr, ids_col_ptr, offs_m,
                                          offs_n, row_ok, col_ok, HAS_BIAS, LABELS)
            loss_rows += tl.sum(term, axis=1).to(tl.float64)
            tiny_rows += tl.sum(tiny, axis=1).to(tl.float64)
            ds_rows += tl.sum(g * acc, axis=1).to(tl.float64)
            db_rows += tl.sum(g, axis=1).to(tl.float64)
            gq = g.to(q_ty)
            other = tl.load(txt_ptr + offs_n.to(tl.int64)[:, None] * stride_tk + offs_v[None, :] * stride_td,
                            mask=col_ok[:, None] & v_ok[None, :], other=0.0)
            if DOT_UPCAST:
                gq = gq.to(tl.float32)
                other = other.to(tl.float32)
            out = tl.dot(gq, other, out, input_precision=DOT_PRECISION)
        first = row_ok & (pid_v == 0)
        tl.store(loss_ptr + offs_m, loss_rows, mask=first)
        tl.store(tiny_ptr + offs_m, tiny_rows, mask=first)
        tl.store(d_scale_ptr + offs_m, ds_rows, mask=first)
        tl.store(d_bias_ptr + offs_m, db_rows, mask=first)
        offs_o = offs_m
        o_ok = row_ok
    tl.store(out_ptr + offs_o.to(tl.int64)[:, None] * stride_om + offs_v[None, :], out,
             mask=o_ok[:, None] & v_ok[None, :])


@triton.jit
def _nested_siglip_tile_kernel(
    img_ptr, txt_ptr, scale_ptr, bias_ptr, ids_row_ptr, ids_col_ptr, bounds_ptr,
    rs_ptr, r_ptr, c_ptr, ws_ptr, sums_ptr, u_col_ptr,
    row0, col0, R, C, M, K, NSIZES,
    stride_im, stride_id, stride_tk, stride_td, stride_ws, stride_wr, stride_wc,
    HAS_BIAS: tl.constexpr, LABELS: tl.constexpr, NEED_GRAD: tl.constexpr, RENORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # The nested (Matryoshka) sweep of one tile: the K loop runs through the size
    # boundaries bounds[0] = 0 < bounds[1] < ... < bounds[NSIZES], and as the running sum
    # passes each boundary, that size's epilogue (steps 2-6 below).  With RENORM, size q's
    # S = (acc * rs_q[i]) * c_q[j] + b (rs = scale / |img prefix|, c = 1 / |txt prefix|),
    # else S = acc * scale + b.  Per size and row, float64 sums_ptr cells (4, NSIZES, M):
    # loss, tiny, sum_j G and p = sum_j G c_q acc (d_scale's and the chain's partial);
    # u_col (NSIZES, K): sum_i G c_q acc rs_q; ws[q] = H_q = r_q G c_q (unweighted, fp32).
    offs_r, offs_c, offs_m, offs_n, row_ok, col_ok = block_tile(tl.program_id(0), row0, col0, R, C, BM, BN, GROUP_M)
    ok = row_ok[:, None] & col_ok[None, :]
    img_rows = img_ptr + offs_m.to(tl.int64)[:, None] * stride_im
    txt_cols = txt_ptr + offs_n.to(tl.int64)[None, :] * stride_tk
    scale = tl.load(scale_ptr).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    else:
        bias = 0.0
    acc = tl.zeros((BM, BN), tl.float32)
    for q in range(0, NSIZES):
        # 1. The running partial sum passes bounds[q + 1]: size q's acc.
        acc = tile_dot_range(acc, img_rows, txt_cols, row_ok, col_ok, tl.load(bounds_ptr + q),
                             tl.load(bounds_ptr + q + 1), stride_id, stride_td, DOT_PRECISION, DOT_UPCAST, BK)
        # 2. Size q's S, 3. its loss terms, 4. G.
        if RENORM:
            rs = tl.load(rs_ptr + q * M + offs_m, mask=row_ok, other=0.0)
            c = tl.load(c_ptr + q * K + offs_n, mask=col_ok, other=0.0)
            s_ij = tl.fma(acc * rs[:, None], c[None, :], bias)
        else:
            s_ij = tl.fma(acc, scale, bias)
        x, pos, e, u, term, tiny = _sigmoid_terms(s_ij, offs_m, offs_n, row_ok, col_ok, ok, ids_row_ptr,
                                                  ids_col_ptr, LABELS)
        if NEED_GRAD:  # G before the atomics: fewer tiles live across them (ptxas spills less)
            g = _sigmoid_grad(x, pos, e, u, ok, LABELS)
        # 5. Row sums in fp32 over the tile, across tiles in float64.
        cells = sums_ptr + q * M + offs_m
        tl.atomic_add(cells, tl.sum(term, axis=1).to(tl.float64), mask=row_ok, sem="relaxed")
        tl.atomic_add(cells + NSIZES * M, tl.sum(tiny, axis=1).to(tl.float64), mask=row_ok, sem="relaxed")
        if NEED_GRAD:
            tl.atomic_add(cells + 2 * NSIZES * M, tl.sum(g, axis=1).to(tl.float64), mask=row_ok, sem="relaxed")
            if RENORM:
                g = g * c[None, :]
            prod = g * acc
            tl.atomic_add(cells + 3 * NSIZES * M, tl.sum(prod, axis=1).to(tl.float64), mask=row_ok,
                          sem="relaxed")
            if RENORM:
                tl.atomic_add(u_col_ptr + q * K + offs_n, tl.sum(prod * rs[:, None], axis=0).to(tl.float64),
                              mask=col_ok, sem="relaxed")
                g = g * tl.load(r_ptr + q * M + offs_m, mask=row_ok, other=0.0)[:, None]
            # 6. H_q into its workspace block (fp32: the host sums the sizes from the largest down).
            ws = ws_ptr + q * stride_ws + offs_r.to(tl.int64)[:, None] * stride_wr + offs_c[None, :] * stride_wc
            tl.store(ws, g, mask=ok)


def tile_config(device: torch.device, dtype: torch.dtype,
                design: Optional[_config.SiglipDesign] = None) -> _config.KernelConfig:
    """The tile: the CLIP backward's entry (interpreter, override), narrowed to 64 x 128 on a GPU,
    or the SigLIP variant's own GPU tile (``config.SIGLIP_VARIANT_TILES``).

    The elementwise epilogue keeps about ten fp32 values per element of the tile live: at
    128 x 128 with 8 warps ptxas (sm_90, bf16) spills 2.2 KB per thread at 255 registers;
    64 x 128 spills 144 B (``python -m clip_fast.kernels.aot_check`` style compile, no GPU
    run: speed unmeasured).
    """
    cfg = _config.get_configs(device, dtype).backward
    if device.type == "cuda" and not _config.overridden():
        own = variant_tile(design.name, dtype) if design is not None else None
        cfg = own or dataclasses.replace(cfg, BM=64, BN=128, num_warps=8)
    return cfg


def variant_tile(name: str, dtype: torch.dtype) -> Optional[_config.KernelConfig]:
    """SigLIP variant ``name``'s own GPU tile (``config.SIGLIP_VARIANT_TILES``), BK halved for fp32
    as the table does (``config.table_configs``); None where the variant has none."""
    own = _config.SIGLIP_VARIANT_TILES.get(name)
    if own is None or dtype != torch.float32:
        return own
    return dataclasses.replace(own, BK=min(own.BK, 32))


def _labels_mode(ids_row, diag_positive: bool) -> int:
    if ids_row is not None:
        return 2
    return 1 if diag_positive else 0


def _launch_fused(img, txt, scale, bias, ids_r, ids_c, labels: int, rows, d_img, d_txt, cfg) -> None:
    """The fused variant: one launch owning row blocks (loss row sums, d_scale, d_bias, d_img),
    one owning column blocks (d_txt); each recomputes the tiles it sweeps."""
    M, D = img.shape
    K = txt.shape[0]
    dv = feature_chunk(D, img.device, img.dtype)
    common = dict(
        M=M, K=K, D=D, stride_im=img.stride(0), stride_id=img.stride(1),
        stride_tk=txt.stride(0), stride_td=txt.stride(1), stride_om=D,
        HAS_BIAS=bias is not None, LABELS=labels, EVEN_D=D % cfg.BK == 0,
        DOT_PRECISION=_config.dot_precision(img.dtype),
        DOT_UPCAST=_config.interpreter_active() and img.dtype == torch.bfloat16,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, DV=dv, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    ptrs = (img, txt, scale, bias if bias is not None else scale, ids_r, ids_c)
    n_v = triton.cdiv(D, dv)
    _siglip_fused_kernel[(triton.cdiv(M, cfg.BM), n_v)](*ptrs, d_img, *rows, TRANSPOSED=False, **common)
    _siglip_fused_kernel[(triton.cdiv(K, cfg.BN), n_v)](*ptrs, d_txt, *rows, TRANSPOSED=True, **common)


def _launch_sweep(img, txt, scale, bias, ids_r, ids_c, labels: int, rows, d_img, d_txt, cfg,
                  need_grad: bool, tma: bool, max_programs: int) -> None:
    """The one-sweep design: the tile kernel over workspace-sized blocks of S; with ``need_grad``
    each block's G goes through the workspace into two cuBLAS GEMMs.  ``max_programs`` > 0: each
    block on a persistent grid of at most that many programs (never more than its tiles)."""
    M, D = img.shape
    K = txt.shape[0]
    if need_grad:
        R, C = block_shape(M, K, img.element_size(), cfg.BM, cfg.BN)
        ws = torch.empty((R, C), device=img.device, dtype=img.dtype)
    else:
        R, C, ws = M, K, None
    for r0 in range(0, M, R):
        r = min(R, M - r0)
        for c0 in range(0, K, C):
            c = min(C, K - c0)
            block = ws[:r, :c] if ws is not None else None
            tiles = triton.cdiv(r, cfg.BM) * triton.cdiv(c, cfg.BN)
            programs = min(tiles, max_programs)
            _siglip_tile_kernel[(programs or tiles,)](
                img, txt, scale, bias if bias is not None else scale, ids_r, ids_c,
                block if block is not None else rows, rows[0], rows[1], rows[2], rows[3],
                r0, c0, r, c, D, max(programs, 1),
                img.stride(0), img.stride(1), txt.stride(0), txt.stride(1),
                block.stride(0) if block is not None else 0,
                block.stride(1) if block is not None else 0,
                HAS_BIAS=bias is not None, LABELS=labels, NEED_GRAD=need_grad, USE_TMA=tma,
                PERSISTENT=programs > 0, EVEN_D=D % cfg.BK == 0, DOT_PRECISION=_config.dot_precision(img.dtype),
                DOT_UPCAST=_config.interpreter_active() and img.dtype == torch.bfloat16,
                BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=8,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            if block is not None:
                # cuBLAS: both gradient GEMMs from the same workspace block.
                d_img[r0:r0 + r].add_(mm_f32(block, txt[c0:c0 + c]))
                d_txt[c0:c0 + c].add_(mm_f32(block.t(), img[r0:r0 + r]))


def _siglip_block_impl(img, txt, scale, bias, ids_row, ids_col, diag_positive: bool,
                       need_grad: bool):
    M, D = img.shape
    K = txt.shape[0]
    dev = img.device
    f32, f64 = torch.float32, torch.float64
    rows = torch.zeros((4, M), device=dev, dtype=f64)  # loss, tiny, d_scale, d_bias per row
    d_img = torch.zeros((M, D) if need_grad else (0, D), device=dev, dtype=f32)
    d_txt = torch.zeros((K, D) if need_grad else (0, D), device=dev, dtype=f32)
    # The variant (config.SIGLIP_VARIANTS): the fused design needs gradients to differ from the
    # sweep; a loss-only call runs the sweep (with TMA loads under "tma", on a persistent grid
    # too under "tma_persistent").
    design = _config.siglip_design()
    fused = need_grad and design.fused_bwd
    cfg = tile_config(dev, img.dtype, design if fused else None)
    labels = _labels_mode(ids_row, diag_positive)
    ids_r = ids_row if ids_row is not None else rows
    ids_c = ids_col if ids_col is not None else rows
    if fused:
        if M and K:
            _launch_fused(img, txt, scale, bias, ids_r, ids_c, labels, rows, d_img, d_txt, cfg)
    elif M and K:
        tma = use_tma(design, img, txt)
        # The persistent grid ("tma_persistent": programs per SM) runs with the descriptor loads
        # only, the compiled and tested pairing (aot_variants); else one program per tile.
        max_programs = design.persistent * _num_sms(dev) if tma else 0
        _launch_sweep(img, txt, scale, bias, ids_r, ids_c, labels, rows, d_img, d_txt, cfg,
                      need_grad, tma, max_programs)
    loss = rows[0].sum() + rows[1].sum() * 2.0 ** -TINY_SHIFT
    if need_grad:
        s = scale.to(f32)
        d_img.mul_(s)
        d_txt.mul_(s)
    return loss, d_img, d_txt, rows[2].sum(), rows[3].sum()


# An opaque custom_op (with a fake implementation for torch.compile), like the CLIP
# backward: its block loop grows as N^2 / workspace, which tracing would unroll.
@torch.library.custom_op("clip_fast::triton_siglip_block", mutates_args=())
def triton_siglip_block(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                        bias: Optional[torch.Tensor], ids_row: Optional[torch.Tensor],
                        ids_col: Optional[torch.Tensor], diag_positive: bool, need_grad: bool
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _siglip_block_impl(img, txt, scale, bias, ids_row, ids_col, diag_positive, need_grad)


@triton_siglip_block.register_fake
def _(img, txt, scale, bias, ids_row, ids_col, diag_positive, need_grad):
    return siglip_block_meta(img, txt, need_grad)


def siglip_block(img, txt, scale, bias, ids_row, ids_col, diag_positive: bool, need_grad: bool):
    """(loss_sum, d_img, d_txt, d_scale, d_bias) of one block (``clip_fast.siglip.backends``)."""
    return torch.ops.clip_fast.triton_siglip_block(img, txt, scale, bias, ids_row, ids_col,
                                                   bool(diag_positive), bool(need_grad))


def _nested_siglip_block_impl(img, txt, scale, bias, ids_row, ids_col, diag_positive: bool, need_grad: bool,
                              nested: NestedOptions):
    """The nested sweep's launches block by block (``_nested_siglip_tile_kernel``), each block's
    gradient GEMMs on the host from the largest size down (each segment multiplied once),
    then ``_nested_finish``."""
    M, D = img.shape
    K, ns = txt.shape[0], len(nested.dims)
    dev, f32 = img.device, torch.float32
    rows, cols = scalings(img, nested.dims, nested.renormalize), scalings(txt, nested.dims, nested.renormalize)
    rs = (rows[0] * scale.to(torch.float64)).to(f32).contiguous()
    r, c = rows[0].to(f32).contiguous(), cols[0].to(f32).contiguous()
    bounds = torch.tensor((0,) + nested.dims, dtype=torch.int32, device=dev)
    sums = torch.zeros((4, ns, M), device=dev, dtype=torch.float64)  # loss, tiny, sum G, p per size and row
    u_col = torch.zeros((ns, K), device=dev, dtype=torch.float64)
    x, y = img.to(f32), txt.to(f32)  # the host GEMMs and the chain in fp32 (a copy only for fp16/bf16)
    d_img = torch.zeros((M, D) if need_grad else (0, D), device=dev, dtype=f32)
    d_txt = torch.zeros((K, D) if need_grad else (0, D), device=dev, dtype=f32)
    cfg = tile_config(dev, img.dtype)
    # One fp32 workspace block per size: the sizes share the workspace budget.
    R, C = block_shape(M, K, 4 * ns, cfg.BM, cfg.BN) if need_grad else (M, K)
    ws = torch.empty((ns, R, C), device=dev, dtype=f32) if need_grad else sums
    ids_r = ids_row if ids_row is not None else sums
    ids_c = ids_col if ids_col is not None else sums
    segs = list(zip((0,) + nested.dims[:-1], nested.dims))
    for r0 in range(0, M, R):
        rr = min(R, M - r0)
        for c0 in range(0, K, C):
            cc = min(C, K - c0)
            _nested_siglip_tile_kernel[(triton.cdiv(rr, cfg.BM) * triton.cdiv(cc, cfg.BN),)](
                img, txt, scale, bias if bias is not None else scale, ids_r, ids_c, bounds,
                rs, r, c, ws, sums, u_col, r0, c0, rr, cc, M, K, ns,
                img.stride(0), img.stride(1), txt.stride(0), txt.stride(1),
                ws.stride(0) if need_grad else 0, ws.stride(1) if need_grad else 0,
                ws.stride(2) if need_grad else 0,
                HAS_BIAS=bias is not None, LABELS=_labels_mode(ids_row, diag_positive), NEED_GRAD=need_grad,
                RENORM=nested.renormalize, DOT_PRECISION=_config.dot_precision(img.dtype),
                DOT_UPCAST=_config.interpreter_active() and img.dtype == torch.bfloat16,
                BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=8, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            if not need_grad:
                continue
            h = None
            for j in range(ns - 1, -1, -1):  # from the largest size down
                part = ws[j, :rr, :cc] * nested.weights[j]
                h = part if h is None else h.add_(part)
                d0, d1 = segs[j]
                d_img[r0:r0 + rr, d0:d1] += torch.mm(h, y[c0:c0 + cc, d0:d1])
                d_txt[c0:c0 + cc, d0:d1] += torch.mm(h.t(), x[r0:r0 + rr, d0:d1])
    return _nested_finish(sums, u_col, d_img, d_txt, x, y, scale, need_grad, nested, rows, cols)


def _nested_finish(sums, u_col, d_img, d_txt, x, y, scale, need_grad: bool, nested: NestedOptions, rows, cols):
    """The weighted sums over the sizes, and each size's normalisation chain."""
    w = torch.tensor(nested.weights, dtype=torch.float64, device=sums.device)
    loss = (w * (sums[0].sum(dim=1) + sums[1].sum(dim=1) * 2.0 ** -TINY_SHIFT)).sum()
    if not need_grad:
        zero = torch.zeros((), dtype=torch.float64, device=sums.device)
        return loss, d_img, d_txt, zero, zero.clone()
    d_bias = (w * sums[2].sum(dim=1)).sum()
    p = sums[3] * w[:, None]
    if nested.renormalize:
        p = p * rows[0]            # sum_j G (S - b) / scale per size and row
    d_scale = p.sum()
    s = scale.to(torch.float32)
    d_img.mul_(s)
    d_txt.mul_(s)
    chains(d_img, d_txt, x, y, nested, rows, cols, p * scale.to(torch.float64), u_col * w[:, None])
    return loss, d_img, d_txt, d_scale, d_bias


@torch.library.custom_op("clip_fast::triton_nested_siglip_block", mutates_args=())
def triton_nested_siglip_block(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                               bias: Optional[torch.Tensor], ids_row: Optional[torch.Tensor],
                               ids_col: Optional[torch.Tensor], diag_positive: bool, need_grad: bool,
                               dims: List[int], weights: List[float], renormalize: bool
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _nested_siglip_block_impl(img, txt, scale, bias, ids_row, ids_col, diag_positive, need_grad,
                                     NestedOptions(tuple(dims), tuple(weights), renormalize))


@triton_nested_siglip_block.register_fake
def _(img, txt, scale, bias, ids_row, ids_col, diag_positive, need_grad, dims, weights, renormalize):
    return siglip_block_meta(img, txt, need_grad)


def nested_siglip_block(img, txt, scale, bias, ids_row, ids_col, diag_positive: bool, need_grad: bool,
                        nested: NestedOptions):
    """``siglip_block``'s contract for the weighted sum over the Matryoshka sizes of ``nested``
    (the gradients those of the raw features, each size's normalisation chain applied)."""
    return torch.ops.clip_fast.triton_nested_siglip_block(
        img, txt, scale, bias, ids_row, ids_col, bool(diag_positive), bool(need_grad), list(nested.dims),
        list(nested.weights), bool(nested.renormalize))


def aot_variants(dtype: torch.dtype, arch: int):
    """The compile variants of ``_siglip_tile_kernel`` (``python -m clip_fast.kernels.aot_check``):
    each label mode, with a bias, at the GPU tile of ``tile_config``; the "tma" and "tma_persistent"
    variants' sweeps (sm_90) and the "fused_bwd" variant's two launches (``config.SIGLIP_VARIANTS``),
    diagonal labels; the nested (Matryoshka) tile."""
    tile = dataclasses.replace(_config.table_configs(arch // 10, dtype).backward, BM=64, BN=128, num_warps=8)
    feat = _config.feature_ptr(dtype)
    ptrs = {n: "*fp64" for n in _siglip_tile_kernel.arg_names if n.endswith("_ptr")}
    ptrs.update(img_ptr=feat, txt_ptr=feat, ws_ptr=feat, scale_ptr="*fp32", bias_ptr="*fp32",
                ids_row_ptr="*i64", ids_col_ptr="*i64")
    ints = frozenset({"row0", "col0", "R", "C", "D", "num_programs", "stride_im", "stride_tk", "stride_wr"})
    div16 = ints - {"num_programs"}
    prec = "tf32" if dtype == torch.float32 else "ieee"
    base = dict(HAS_BIAS=True, NEED_GRAD=True, USE_TMA=False, PERSISTENT=False, EVEN_D=True, DOT_UPCAST=False,
                GROUP_M=8, DOT_PRECISION=prec, stride_id=1, stride_td=1, stride_wc=1)
    for labels, name in ((0, "negatives"), (1, "diagonal"), (2, "group ids")):
        yield _config.AotVariant("siglip", f"tile {name}", _siglip_tile_kernel, tile,
                                 dict(base, LABELS=labels), ints=ints, div16=div16,
                                 pointers=tuple(ptrs.items()))
    if arch >= 90:   # the "tma" and "tma_persistent" variants are Hopper's
        for name, extra in (("tile diagonal tma", {}), ("tile diagonal tma persistent", dict(PERSISTENT=True))):
            yield _config.AotVariant("siglip", name, _siglip_tile_kernel, tile,
                                     dict(base, LABELS=1, USE_TMA=True, **extra), ints=ints, div16=div16,
                                     pointers=tuple(ptrs.items()))
    fused_tile = variant_tile("fused_bwd", dtype)
    fptrs = {n: "*fp64" for n in _siglip_fused_kernel.arg_names if n.endswith("_ptr")}
    fptrs.update(img_ptr=feat, txt_ptr=feat, out_ptr="*fp32", scale_ptr="*fp32", bias_ptr="*fp32",
                 ids_row_ptr="*i64", ids_col_ptr="*i64")
    fints = frozenset({"M", "K", "D", "stride_im", "stride_tk", "stride_om"})
    fbase = dict(HAS_BIAS=True, LABELS=1, EVEN_D=True, DOT_PRECISION=prec, DOT_UPCAST=False,
                 DV=dv_cap(dtype, arch), stride_id=1, stride_td=1)
    for transposed, name in ((False, "fused rows d_img"), (True, "fused cols d_txt")):
        yield _config.AotVariant("siglip", name, _siglip_fused_kernel, fused_tile,
                                 dict(fbase, TRANSPOSED=transposed), ints=fints, div16=fints,
                                 pointers=tuple(fptrs.items()))
    # The nested (Matryoshka) tile: both normalisations on the diagonal labels.
    nptrs = {n: "*fp32" for n in _nested_siglip_tile_kernel.arg_names if n.endswith("_ptr")}
    nptrs.update(img_ptr=feat, txt_ptr=feat, ids_row_ptr="*i64", ids_col_ptr="*i64", bounds_ptr="*i32",
                 sums_ptr="*fp64", u_col_ptr="*fp64")
    nints = frozenset({"row0", "col0", "R", "C", "M", "K", "stride_im", "stride_tk", "stride_ws", "stride_wr"})
    nbase = {k: v for k, v in base.items() if k not in ("EVEN_D", "USE_TMA", "PERSISTENT")}
    for renorm in (True, False):
        yield _config.AotVariant("siglip", f"nested tile {'renorm' if renorm else 'raw'}", _nested_siglip_tile_kernel,
                                 tile, dict(nbase, LABELS=1, RENORM=renorm), ints=nints | {"NSIZES"}, div16=nints,
                                 pointers=tuple(nptrs.items()))
