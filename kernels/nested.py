"""Nested (Matryoshka) sweeps in Triton: every prefix size's row lse, column lse and diagonal of
one (M, K) block in ONE pass over D, and the gradient through every size with each K segment
multiplied once.  The torch twin, and the contract these follow, is
``clip_fast.clip.backends.nested_torch``: the single-process loss sweeps the square block, the
distributed modes rectangular ones, whose diagonal of min(M, K) entries holds the label pairs
(or, on a block without any, ordinary entries the caller passes back as ``diag``).

For sizes d_1 < ... < d_n (segments [d_{k-1}, d_k), d_0 = 0) size k's logits are

    S_k = (R_k * rs_k[:, None]) * c_k[None, :],      R_k = sum_{j <= k} x[:, seg_j] @ y[:, seg_j].T

(re-normalised prefixes: rs_k = scale / |x[:, :d_k]|, c_k = 1 / |y[:, :d_k]|), or S_k = R_k
on x = scale * img without re-normalisation.

Forward (``_nested_lse_kernel``; grid: row blocks of BM rows).  Per tile of S and per size k
(the number of sizes, NS, is a compile-time constant, the size loop unrolled):

1. the tile's accumulator runs on over segment k (BK slices masked at d_k): it now holds
   the tile of R_k -- the GEMM work over all sizes is that of the largest;
2. size k's epilogue: S2_k = S_k * log2(e) (the scalings applied to a copy; the accumulator
   runs on unscaled);
3. the diagonal S2_k[i, i], on the tiles that hold it, written out and taken out of the sums
   (-inf), as the backend contract asks (the host adds it back in float64);
4. size k's online row (max, sum), kept as column k of a (BM, next_pow2(NS)) register pair:
   a size's statistics are selected and written back with a mask on that small axis;
5. size k's column sums under the fixed shift H2 - c2_k[j] (c2_k: a Cauchy-Schwarz bound on
   S2_k's column, from the prefix norms and the scalings) merged with relaxed atomics, and
   its column maxima -- ``kernels/lse_forward.py``'s steps 4 and 4b, per size, with the same
   constants and the same exact fallback (the transposed problem, rows flagged) for a
   column whose shifted sum underflowed (docs/numerics.md).

Backward (``_nested_grad_kernel`` + cuBLAS).  d_x[:, seg_j] = s * (sum_{k >= j} H_k) @ y[:, seg_j]
with H_k = r_k[:, None] * G_k * c_k[None, :] (H_k = G_k without re-normalisation), and
d_y[:, seg_j] = s * (sum_{k >= j} H_k).T @ x[:, seg_j].  In blocks of R x C of S (the workspace
budget shared by the NS sizes), the kernel recomputes each tile's R_k exactly as the forward
did (same tile shape, same segment loop, same scaling operations: S_k bit for bit), forms G_k
and H_k per size, and writes the reverse-cumulative sums A_j = sum_{k >= j} H_k into an
(NS, R, C) workspace: H_k is stored for k < NS - 1 while going up, the last H stays in
registers and, going down, A_j = A_{j+1} + H_j is read back, summed in the accumulator's dtype
and stored over H_j (each element is read and written by one program; a barrier between the
two passes).  Then per segment j two cuBLAS GEMMs, d_x[rows, seg_j] += A_j @ y[cols, seg_j]
and d_y[cols, seg_j] += A_j.T @ x[rows, seg_j]: each segment is multiplied once per block,
so the backward's GEMM work is also that of the largest size.  The per-size chain sums
u_k = sum_j G_k S_k (rows and columns) are reduced in the kernel into float64 cells.

Why this design (the rejected options): accumulating d_x in the kernel needs a BM x D fp32
accumulator per output (``kernels/grad_backward.py``'s argument); summing the H's on the
host would read and write the workspace NS - 1 more times; forming the H's in decreasing k
would need every size's partial accumulator at once (NS tiles of registers).  The cost
here is NS workspace tiles written and NS - 1 read back per tile, against the D / BK
MMA slices of the recompute.

The accumulator's dtype follows the operands: float32 for fp16/bf16/fp32 features (tl.dot
accumulates in fp32), float64 for float64 (``m_ptr``/``lse_ptr``'s element type).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import config as _config
from ..core.numerics import LOG2E, combine_diag, compute_dtype, diag_grad, split_float
from .lse_forward import COL_SLACK, COL_UNDERFLOW, LN2, headroom_log2, merge_log2_parts
from .tile import block_tile, tile_dot_range
from .workspace import block_shape, mm_f32

_LOG2E_K = tl.constexpr(1.4426950408889634)


@triton.jit
def _size_logits(acc, rs_ptr, c_ptr, offs_m, offs_n, row_ok, col_ok, RENORM: tl.constexpr):
    """Size k's tile of S (natural units) from the running sum: (R * rs[:, None]) * c[None, :],
    the operations of nested_torch's ``_size_logits``, or R itself without re-normalisation."""
    if RENORM:
        rs = tl.load(rs_ptr + offs_m, mask=row_ok, other=0.0)
        c = tl.load(c_ptr + offs_n, mask=col_ok, other=0.0)
        return (acc * rs[:, None]) * c[None, :]
    return acc


@triton.jit
def _next_size(acc, k, d_lo, dims_ptr, x_rows, y_cols, rs_ptr, c_ptr, offs_m, offs_n, row_ok, col_ok, M, N,
               stride_xd, stride_yd, RENORM: tl.constexpr, DOT_PRECISION: tl.constexpr,
               DOT_UPCAST: tl.constexpr, BK: tl.constexpr):
    """Step 1 of both sweeps, one code path so the backward's S is the forward's bit for bit:
    the running sum over segment k (from d_lo to d_k), then size k's tile of S in natural units.
    Returns (acc, d_k, S_k)."""
    d_hi = tl.load(dims_ptr + k)
    acc = tile_dot_range(acc, x_rows, y_cols, row_ok, col_ok, d_lo, d_hi, stride_xd, stride_yd,
                         DOT_PRECISION, DOT_UPCAST, BK)
    s = _size_logits(acc, rs_ptr + k * M, c_ptr + k * N, offs_m, offs_n, row_ok, col_ok, RENORM)
    return acc, d_hi, s


# One kernel body, longer than a screen on purpose: the tile loop with its per-size epilogue
# is the whole sweep, numbered as in the module doc.
@triton.jit
def _nested_lse_kernel(
    x_ptr, y_ptr, dims_ptr, rs_ptr, c_ptr, c2_ptr, row_flag_ptr,
    m_ptr, l_ptr, col_sum_ptr, col_max_ptr, diag2_ptr,
    M, N, H2, stride_xm, stride_xd, stride_ym, stride_yd,
    NS: tl.constexpr, KP: tl.constexpr, RENORM: tl.constexpr, COMPUTE_COL: tl.constexpr,
    WRITE_DIAG: tl.constexpr, ROW_FLAGS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    acc_t = m_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    row_ok = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    n_hi = N
    if ROW_FLAGS:
        # Fallback mode: a block without a flagged row does no work.
        flags = tl.load(row_flag_ptr + offs_m, mask=row_ok, other=0)
        n_hi = tl.where(tl.max(flags, axis=0) > 0, N, 0)
    size = tl.arange(0, KP)[None, :]
    m_all = tl.full((BM, KP), float("-inf"), acc_t)   # per size: running row max (log2 units)
    l_all = tl.zeros((BM, KP), acc_t)                 # per size: running row sum of 2^(S2 - m)
    for start_n in range(0, n_hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        col_ok = offs_n < N
        y_cols = y_ptr + offs_n.to(tl.int64)[None, :] * stride_ym
        on_diag = (start_n < pid_m * BM + BM) & (start_n + BN > pid_m * BM)
        eq = offs_m[:, None] == offs_n[None, :]
        acc = tl.zeros((BM, BN), acc_t)
        d_lo = 0
        for k in tl.static_range(NS):
            # 1. The running sum over segment k: the tile of R_k, and size k's logits.
            acc, d_lo, s = _next_size(acc, k, d_lo, dims_ptr, x_rows, y_cols, rs_ptr, c_ptr, offs_m, offs_n,
                                      row_ok, col_ok, M, N, stride_xd, stride_yd, RENORM, DOT_PRECISION,
                                      DOT_UPCAST, BK)
            # 2. In log2 units.
            s2 = s * _LOG2E_K
            # 3. The diagonal, written and taken out of the sums.
            if on_diag:
                if WRITE_DIAG:
                    dg = tl.sum(tl.where(eq, s2, 0.0), axis=1)
                    on_tile = row_ok & (offs_m < N) & (offs_m >= start_n) & (offs_m < start_n + BN)
                    tl.store(diag2_ptr + k * M + offs_m, dg, mask=on_tile)
                s2 = tl.where(eq, float("-inf"), s2)
            # 4. Size k's online row statistics (padded columns -inf; m_ref = 0 keeps a row
            #    with no finite entry yet away from -inf - -inf).
            s2 = tl.where(col_ok[None, :], s2, float("-inf"))
            m_k = tl.max(tl.where(size == k, m_all, float("-inf")), axis=1)
            l_k = tl.sum(tl.where(size == k, l_all, 0.0), axis=1)
            m_new = tl.maximum(m_k, tl.max(s2, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_k = l_k * tl.exp2(m_k - m_ref) + tl.sum(tl.exp2(s2 - m_ref[:, None]), axis=1)
            m_all = tl.where(size == k, m_new[:, None], m_all)
            l_all = tl.where(size == k, l_k[:, None], l_all)
            if COMPUTE_COL:
                # 5. Column sums under the fixed shift (padded columns: c2 = +inf, term 0;
                #    padded rows zeroed), and the column maxima.
                c2 = tl.load(c2_ptr + k * N + offs_n, mask=col_ok, other=float("inf"))
                e = tl.exp2(s2 + (H2 - c2)[None, :])
                e = tl.where(row_ok[:, None], e, 0.0)
                tl.atomic_add(col_sum_ptr + k * N + offs_n, tl.sum(e, axis=0), mask=col_ok, sem="relaxed")
                c_max = tl.max(tl.where(row_ok[:, None], s2, float("-inf")), axis=0)
                tl.atomic_max(col_max_ptr + k * N + offs_n, c_max, mask=col_ok, sem="relaxed")
    out = size * M + offs_m[:, None]
    keep = row_ok[:, None] & (size < NS)
    tl.store(m_ptr + out, m_all, mask=keep)
    tl.store(l_ptr + out, l_all, mask=keep)


# One kernel body, longer than a screen on purpose: the recompute, each size's G and H, and the
# reverse-cumulative sums are one tile's work, read top to bottom.
@triton.jit
def _nested_grad_kernel(
    x_ptr, y_ptr, dims_ptr, rs_ptr, c_ptr, r_ptr, lse_row_ptr, lse_col_ptr, g_diag_ptr, coef_ptr,
    ws_ptr, u_row_ptr, u_col_ptr,
    row0, col0, R, C, M, N, stride_xm, stride_xd, stride_ym, stride_yd, stride_wk, stride_wr, gscale,
    NS: tl.constexpr, RENORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    acc_t = lse_row_ptr.dtype.element_ty
    offs_r, offs_c, offs_m, offs_n, row_ok, col_ok = block_tile(tl.program_id(0), row0, col0, R, C, BM, BN, GROUP_M)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    y_cols = y_ptr + offs_n.to(tl.int64)[None, :] * stride_ym
    eq = offs_m[:, None] == offs_n[None, :]
    ws = ws_ptr + offs_r.to(tl.int64)[:, None] * stride_wr + offs_c[None, :]
    acc = tl.zeros((BM, BN), acc_t)
    d_lo = 0
    for k in tl.static_range(NS):
        # 1. Size k's tile of S, recomputed as the forward formed it.
        acc, d_lo, s = _next_size(acc, k, d_lo, dims_ptr, x_rows, y_cols, rs_ptr, c_ptr, offs_m, offs_n,
                                  row_ok, col_ok, M, N, stride_xd, stride_yd, RENORM, DOT_PRECISION,
                                  DOT_UPCAST, BK)
        s2 = s * _LOG2E_K
        # 2. G_k = coef_row P_row + coef_col P_col, each lse a float-float pair (hi, lo) in log2
        #    units (grad_backward's step 3): S2 is the forward's bit for bit, so P is consistent
        #    with the forward's lse.  The diagonal from the forward's float64 terms.
        r_hi = tl.load(lse_row_ptr + k * M + offs_m, mask=row_ok, other=0.0)
        r_lo = tl.load(lse_row_ptr + (NS + k) * M + offs_m, mask=row_ok, other=0.0)
        c_hi = tl.load(lse_col_ptr + k * N + offs_n, mask=col_ok, other=0.0)
        c_lo = tl.load(lse_col_ptr + (NS + k) * N + offs_n, mask=col_ok, other=0.0)
        coef_row = tl.load(coef_ptr + k)
        coef_col = tl.load(coef_ptr + NS + k)
        # A zero coefficient switches its term off: its exponent is -inf (the lse it would read
        # is a placeholder, whose exp2 could overflow, and inf * 0 would be NaN).
        e_row = tl.where(coef_row != 0, (s2 - r_hi[:, None]) - r_lo[:, None], float("-inf"))
        e_col = tl.where(coef_col != 0, (s2 - c_hi[None, :]) - c_lo[None, :], float("-inf"))
        g = coef_row * tl.exp2(e_row) + coef_col * tl.exp2(e_col)
        g_ii = tl.load(g_diag_ptr + k * M + offs_m, mask=row_ok, other=0.0)
        g = tl.where(eq, g_ii[:, None], g)
        g = tl.where(tile_ok, g, 0.0)
        if RENORM:
            # 3. The chain sums u_k = sum G_k S_k along rows and columns (float64 cells), then
            #    H_k = r_k G_k c_k.
            gs = g * s
            tl.atomic_add(u_row_ptr + k * M + offs_m, tl.sum(gs, axis=1).to(tl.float64), mask=row_ok,
                          sem="relaxed")
            tl.atomic_add(u_col_ptr + k * N + offs_n, tl.sum(gs, axis=0).to(tl.float64), mask=col_ok,
                          sem="relaxed")
            r_k = tl.load(r_ptr + k * M + offs_m, mask=row_ok, other=0.0)
            c_k = tl.load(c_ptr + k * N + offs_n, mask=col_ok, other=0.0)
            g = (g * r_k[:, None]) * c_k[None, :]
        g = g * gscale
        if k < NS - 1:
            tl.store(ws + k * stride_wk, g.to(ws_ptr.dtype.element_ty), mask=tile_ok)
    # 4. From the largest size down: A_j = A_{j+1} + H_j over the H's stored going up.
    tl.store(ws + (NS - 1) * stride_wk, g.to(ws_ptr.dtype.element_ty), mask=tile_ok)
    tl.debug_barrier()
    for i in tl.static_range(NS - 1):
        j = NS - 2 - i
        g += tl.load(ws + j * stride_wk, mask=tile_ok, other=0.0).to(acc_t)
        tl.store(ws + j * stride_wk, g.to(ws_ptr.dtype.element_ty), mask=tile_ok)


def _flags(dtype: torch.dtype) -> dict:
    return dict(DOT_PRECISION="ieee" if dtype == torch.float64 else _config.dot_precision(dtype),
                DOT_UPCAST=_config.interpreter_active() and dtype == torch.bfloat16)


# The nested sweeps' tile on a GPU.  128 x 64 (BN halved from the plain kernels' 128 x 128): the
# per-size row statistics and the backward's reverse sums keep more registers live, and at
# 128 x 128 ptxas spills (sm_90 bf16: ~1-2 KB of spill stores per kernel) where 128 x 64 does not
# (forward) or barely (backward, tens of bytes at most) --
# ``python -m clip_fast.kernels.aot_check --only nested``.
# Untimed: chosen from the compile report alone.  fp32 halves BK (shared memory, as the table).
_GPU_TILE = _config.KernelConfig(128, 64, 64, 8, 3)
# float64: a 64 x 64 tile (a 128 x 128 float64 accumulator spills heavily, and three stages of
# 128 x 32 float64 slices exceed sm_80's shared memory).
_FP64_TILE = _config.KernelConfig(64, 64, 32, 4, 2)


def gpu_tile(dtype: torch.dtype) -> _config.KernelConfig:
    if dtype == torch.float64:
        return _FP64_TILE
    if dtype == torch.float32:
        return _config.KernelConfig(_GPU_TILE.BM, _GPU_TILE.BN, 32, _GPU_TILE.num_warps, _GPU_TILE.num_stages)
    return _GPU_TILE


def _tile(x: torch.Tensor) -> _config.KernelConfig:
    """The tile of both sweeps (the backward's S is the forward's bit for bit): ``gpu_tile`` on
    CUDA, the configured forward tile under the interpreter or a ``config.override``."""
    if x.device.type == "cuda" and _config._override is None:
        return gpu_tile(x.dtype)
    return _config.get_configs(x.device, x.dtype).forward


def _launch_sweep(x, y, dims_t, rs, c, c2, row_flags, col_sum, col_max, diag2, H2, ns):
    """One launch of the forward kernel over x's (M) rows against y's (K): returns the (NS, M)
    row lse in log2 units (float64, off-diagonal) and fills col_sum / col_max (NS, K) and diag2
    (NS, M; its first min(M, K) columns) when given."""
    n, k_cols = x.shape[0], y.shape[0]
    cd = compute_dtype(x.dtype)
    tile = _tile(x)
    m_part = torch.empty((ns, n), device=x.device, dtype=cd)
    l_part = torch.empty((ns, n), device=x.device, dtype=cd)
    dummy = m_part
    _nested_lse_kernel[(triton.cdiv(n, tile.BM),)](
        x, y, dims_t, dummy if rs is None else rs, dummy if c is None else c, dummy if c2 is None else c2,
        dims_t if row_flags is None else row_flags, m_part, l_part,
        dummy if col_sum is None else col_sum, dummy if col_max is None else col_max,
        dummy if diag2 is None else diag2,
        n, k_cols, H2, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        NS=ns, KP=triton.next_power_of_2(ns), RENORM=rs is not None, COMPUTE_COL=col_sum is not None,
        WRITE_DIAG=diag2 is not None, ROW_FLAGS=row_flags is not None, **_flags(x.dtype),
        BM=tile.BM, BN=tile.BN, BK=tile.BK, num_warps=tile.num_warps, num_stages=tile.num_stages)
    return merge_log2_parts(m_part[None], l_part[None])


def _prefix_norms(t: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """(NS, N) float64 norms of t[:, :d_k], as running sums over the segments."""
    bounds = (0,) + tuple(dims)
    t64 = t.to(torch.float64)
    parts = torch.stack([t64[:, d0:d1].square().sum(dim=1) for d0, d1 in zip(bounds[:-1], bounds[1:])])
    return parts.cumsum(dim=0).sqrt_()


def _column_bounds_log2(x, y, dims, rs, c) -> torch.Tensor:
    """c2_k[j] >= S2_k[i, j] for every i: log2(e) (1 + 2^-7) max_i(|rs_k[i]| |x_i[:d_k]|)
    |c_k[j]| |y_j[:d_k]| (Cauchy-Schwarz; the slack covers the accumulation's rounding)."""
    rows, cols = _prefix_norms(x, dims), _prefix_norms(y, dims)
    if rs is not None:
        rows = rows * rs.abs().to(torch.float64)
        cols = cols * c.abs().to(torch.float64)
    bound = rows.amax(dim=1, keepdim=True) * cols * (COL_SLACK * LOG2E)
    return bound.to(compute_dtype(x.dtype)).contiguous()


@torch.no_grad()
def nested_lse_forward(x: torch.Tensor, y: torch.Tensor, dims: Sequence[int], rs: Optional[torch.Tensor],
                       c: Optional[torch.Tensor], chunk_size: Optional[int] = None):
    """(lse_row (n_sizes, M), lse_col (n_sizes, K), diag (n_sizes, min(M, K))), float64:
    ``nested_torch.nested_lse_forward``'s contract.  x: (M, D), y: (K, D), fp16/bf16/fp32/fp64
    (the GEMM operands; x = scale * img without re-normalisation); rs: (n_sizes, M) and
    c: (n_sizes, K) in the accumulator's dtype, or both None.  ``chunk_size`` is accepted for
    the contract and unused (the kernel's tiles bound memory)."""
    n, k_cols, ns = x.shape[0], y.shape[0], len(dims)
    cd = compute_dtype(x.dtype)
    dev = x.device
    if n == 0 or k_cols == 0:
        return _empty_stats(n, k_cols, ns, dev)
    dims_t = torch.tensor(list(dims), dtype=torch.int32, device=dev)
    rs = None if rs is None else rs.to(cd).contiguous()
    c = None if c is None else c.to(cd).contiguous()
    c2 = _column_bounds_log2(x, y, dims, rs, c)
    H2 = headroom_log2(n)
    col_sum = torch.zeros((ns, k_cols), device=dev, dtype=cd)
    col_max = torch.full((ns, k_cols), float("-inf"), device=dev, dtype=cd)
    diag2 = torch.empty((ns, n), device=dev, dtype=cd)
    row_off2 = _launch_sweep(x, y, dims_t, rs, c, c2, None, col_sum, col_max, diag2, H2, ns)
    diag2 = diag2[:, :min(n, k_cols)]
    # Column lse relative to the column's largest S2 (lse_forward_offdiag's finishing step).
    shift = c2.new_full((), H2) - c2
    top = (col_max + shift).to(torch.float64)
    col_off2 = torch.where(col_max == float("-inf"), col_max.to(torch.float64),
                           col_max.to(torch.float64) + torch.log2(col_sum.to(torch.float64)) - top)
    # A column's shifted total: its off-diagonal sum plus its diagonal term (columns past
    # min(M, K) have none).
    total = col_sum.to(torch.float64)
    total[:, :diag2.shape[1]] += torch.exp2(diag2.to(torch.float64) + shift[:, :diag2.shape[1]].to(torch.float64))
    flags = (total < COL_UNDERFLOW) | ~torch.isfinite(total)
    if bool(flags.any()):
        # The exact fallback: the transposed problem (rows scaled by c, columns by rs), only
        # on the row blocks holding a flagged column of some size.
        exact2 = _launch_sweep(y, x, dims_t, c, rs, None, flags.any(dim=0).to(torch.int32),
                               None, None, None, H2, ns)
        col_off2 = torch.where(flags, exact2, col_off2)
    diag = diag2.to(torch.float64) * LN2
    lse_row = torch.stack([combine_diag(row_off2[k] * LN2, diag[k]) for k in range(ns)])
    lse_col = torch.stack([combine_diag(col_off2[k] * LN2, diag[k]) for k in range(ns)])
    return lse_row, lse_col, diag


def _empty_stats(m: int, k: int, ns: int, dev: torch.device):
    """The statistics of a block without entries (M or K zero): the lse of an empty sum, -inf."""
    f64 = torch.float64
    return (torch.full((ns, m), float("-inf"), dtype=f64, device=dev),
            torch.full((ns, k), float("-inf"), dtype=f64, device=dev), torch.empty((ns, 0), dtype=f64, device=dev))


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b) if a.dtype == torch.float64 else mm_f32(a, b)


def _lse_pair(lse: torch.Tensor, cd: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 lse (natural) as (hi, lo) in log2 units and the accumulator's dtype."""
    lse2 = lse.to(torch.float64) * LOG2E
    if cd == torch.float64:
        return lse2, torch.zeros_like(lse2)
    return split_float(lse2)


def _lse_pairs(lse: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """(2, NS, L): every size's float64 lse (NS, L) as its (hi, lo) pair of ``_lse_pair``."""
    pairs = [_lse_pair(lse[k], cd) for k in range(lse.shape[0])]
    return torch.stack([torch.stack([p[i] for p in pairs]) for i in (0, 1)]).to(cd).contiguous()


def _gscale(coefs, r, c, ns: int) -> float:
    """A power of two putting every |A_j| <= 1 (fp16 keeps range; exact in any dtype)."""
    bound = 0.0
    for k in range(ns):
        cd = coefs[2][k]
        cd = float(cd.abs().max()) if isinstance(cd, torch.Tensor) and cd.numel() else abs(float(cd or 0.0))
        g = abs(coefs[0][k]) + abs(coefs[1][k]) + cd
        if r is not None:
            g *= float(r[k].abs().max()) * float(c[k].abs().max())
        bound += g
    if not math.isfinite(bound) or bound <= 0.0:
        return 1.0
    return 2.0 ** min(64, max(-64, math.floor(-math.log2(bound))))


@torch.no_grad()
def nested_grad_backward(x_gemm: torch.Tensor, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor,
                         dims: Sequence[int], rs: Optional[torch.Tensor], r: Optional[torch.Tensor],
                         c: Optional[torch.Tensor], lse_row: torch.Tensor, lse_col: torch.Tensor,
                         diag: torch.Tensor, coefs, chunk_size: Optional[int] = None):
    """(d_x, d_y, u_row, u_col, d_scale): ``nested_torch.nested_grad_backward``'s contract on an
    (M, K) block.  x_gemm, y: the forward's operands (any of fp16/bf16/fp32/fp64); x: the
    features (any float dtype, cast to the operands' for the d_y GEMMs).  d_x, d_y in the
    accumulator's dtype; u_row (n_sizes, M), u_col (n_sizes, K)."""
    n, k_cols, ns, D = x_gemm.shape[0], y.shape[0], len(dims), x_gemm.shape[1]
    op = x_gemm.dtype
    cd = compute_dtype(op)
    dev = x_gemm.device
    segs = list(zip((0,) + tuple(dims[:-1]), dims))
    d_x = torch.zeros((n, D), device=dev, dtype=cd)
    d_y = torch.zeros((k_cols, D), device=dev, dtype=cd)
    u_row = torch.zeros((ns, n), dtype=torch.float64, device=dev)
    u_col = torch.zeros((ns, k_cols), dtype=torch.float64, device=dev)
    if n == 0 or k_cols == 0:
        return d_x, d_y, u_row, u_col, torch.zeros((), dtype=torch.float64, device=dev)
    x_op = x.to(op)
    dims_t = torch.tensor(list(dims), dtype=torch.int32, device=dev)
    lse_r, lse_c = _lse_pairs(lse_row, cd), _lse_pairs(lse_col, cd)
    # G's diagonal per size, (NS, M): the first min(M, K) entries, the rest never read.
    g_diag = torch.zeros((ns, n), dtype=cd, device=dev)
    g_diag[:, :diag.shape[1]] = torch.stack([diag_grad(lse_row[k], lse_col[k], diag[k], coefs[0][k], coefs[1][k],
                                                       coefs[2][k]) for k in range(ns)]).to(cd)
    coef_t = torch.tensor([list(coefs[0]), list(coefs[1])], dtype=cd, device=dev)
    renorm = rs is not None
    rs_t, r_t, c_t = ((None, None, None) if not renorm else
                      (rs.to(cd).contiguous(), r.to(cd).contiguous(), c.to(cd).contiguous()))
    gscale = _gscale(coefs, r_t, c_t, ns)
    tile = _tile(x_gemm)
    R, C = block_shape(n, k_cols, x_gemm.element_size() * ns, tile.BM, tile.BN)
    ws = torch.empty((ns, R, C), device=dev, dtype=op)
    dummy = u_row
    for r0 in range(0, n, R):
        r1 = min(r0 + R, n)
        for c0 in range(0, k_cols, C):
            c1 = min(c0 + C, k_cols)
            block = ws[:, :r1 - r0, :c1 - c0]
            grid = (triton.cdiv(r1 - r0, tile.BM) * triton.cdiv(c1 - c0, tile.BN),)
            _nested_grad_kernel[grid](
                x_gemm, y, dims_t, dummy if not renorm else rs_t, dummy if not renorm else c_t,
                dummy if not renorm else r_t, lse_r, lse_c, g_diag, coef_t, block, u_row, u_col,
                r0, c0, r1 - r0, c1 - c0, n, k_cols, x_gemm.stride(0), x_gemm.stride(1), y.stride(0), y.stride(1),
                block.stride(0), block.stride(1), gscale, NS=ns, RENORM=renorm, **_flags(op),
                BM=tile.BM, BN=tile.BN, BK=tile.BK, GROUP_M=8, num_warps=tile.num_warps,
                num_stages=tile.num_stages)
            # Each segment once: A_j against the block's columns of y (d_x) and rows of x (d_y).
            for j, (d0, d1) in enumerate(segs):
                d_x[r0:r1, d0:d1] += _mm(block[j], y[c0:c1, d0:d1])
                d_y[c0:c1, d0:d1] += _mm(block[j].t(), x_op[r0:r1, d0:d1])
    d_x.div_(gscale)
    d_y.div_(gscale)
    d_scale = (d_x * x.to(cd)).sum(dim=1, dtype=torch.float64).sum()
    s_cd = s.to(cd)
    return d_x.mul_(s_cd), d_y.mul_(s_cd), u_row, u_col, d_scale


def aot_variants(dtype: torch.dtype, arch: int):
    """The compile variants of the nested kernels (``python -m clip_fast.kernels.aot_check``):
    five sizes, both normalisation modes, padded tiles; with fp32 also the float64 kernels."""
    builds = [(dtype, "", gpu_tile(dtype))]
    if dtype == torch.float32:
        builds.append((torch.float64, " fp64", gpu_tile(torch.float64)))
    for op, tag, tile in builds:
        feat = "*fp64" if op == torch.float64 else _config.feature_ptr(op)
        acc = "*fp64" if op == torch.float64 else "*fp32"
        prec = "ieee" if op != torch.float32 else "tf32"
        base = dict(NS=5, DOT_PRECISION=prec, DOT_UPCAST=False, stride_xd=1, stride_yd=1)
        fwd = dict(base, KP=8, COMPUTE_COL=True, WRITE_DIAG=True, ROW_FLAGS=False)
        ints = frozenset({"M", "N", "stride_xm", "stride_ym"})
        stats = ("rs_ptr", "c_ptr", "c2_ptr", "m_ptr", "l_ptr", "col_sum_ptr", "col_max_ptr", "diag2_ptr")
        for name, ce in ((f"nested sweep renorm{tag}", dict(fwd, RENORM=True)),
                         (f"nested sweep raw{tag}", dict(fwd, RENORM=False)),
                         (f"nested fallback{tag}", dict(fwd, RENORM=True, COMPUTE_COL=False, WRITE_DIAG=False,
                                                        ROW_FLAGS=True))):
            yield _config.AotVariant(
                "forward", name, _nested_lse_kernel, tile, ce, ints=ints, div16=ints, floats=frozenset({"H2"}),
                pointers=(("x_ptr", feat), ("y_ptr", feat), ("dims_ptr", "*i32"), ("row_flag_ptr", "*i32"))
                + tuple((p, acc) for p in stats))
        ints = frozenset({"row0", "col0", "R", "C", "M", "N", "stride_xm", "stride_ym", "stride_wk", "stride_wr"})
        for name, ce in ((f"nested tile renorm{tag}", dict(base, RENORM=True, GROUP_M=8)),
                         (f"nested tile raw{tag}", dict(base, RENORM=False, GROUP_M=8))):
            yield _config.AotVariant(
                "backward", name, _nested_grad_kernel, tile, ce, ints=ints, div16=ints,
                floats=frozenset({"gscale"}),
                pointers=(("x_ptr", feat), ("y_ptr", feat), ("dims_ptr", "*i32"), ("ws_ptr", feat),
                          ("u_row_ptr", "*fp64"), ("u_col_ptr", "*fp64"))
                + tuple((p, acc) for p in ("rs_ptr", "c_ptr", "r_ptr", "lse_row_ptr", "lse_col_ptr", "g_diag_ptr",
                                           "coef_ptr")))
