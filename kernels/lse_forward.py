"""Forward: row lse, column lse and diagonal of S = s * img @ txt.T + b in ONE sweep.

Layout: the grid runs over row blocks of ``img`` (BM rows each; optionally also over
``col_splits`` ranges of columns when the row blocks alone cannot fill the GPU).
Each program loops over the column blocks of ``txt`` and, per tile of S:

1. computes the tile ``acc = img_blk @ txt_blk.T`` in fp32 (loop over D in BK slices);
2. moves to log2 units, ``S2 = acc * (s * log2 e) + b * log2 e``, so every
   exponential is a single ``exp2``;
3. online (flash-style) row log-sum-exp in registers: running max ``m_i`` and
   running sum ``l_i`` -- exact, whatever the range of S;
4. column sums merged across programs with ``tl.atomic_add`` under a fixed per-column
   shift, and column maxima with ``tl.atomic_max``;
5. the diagonal S2_ii, taken from the tile that holds it (runs only on the tiles
   that cross the diagonal), written out and then excluded from steps 3 and 4.

The numerics -- the column bound c_j >= S_ij and its slack, the headroom H2, the
underflow flag and the exact fallback on the transposed problem, why the diagonal stays
out of the sums and comes back in float64, why columns record their maxima, and when one
exponential could serve both softmaxes -- are derived in docs/numerics.md, which the
CUDA kernels follow too.

Layout variants (``config.VARIANTS``): the tiles through tensor descriptors (``USE_TMA``), and a
persistent grid (``PERSISTENT``) whose programs walk the (row block, column split) units in
the grouped order of ``tile.grouped_tile``; each unit's sweep is the same function, ``_sweep_unit``.

Why a fixed column shift (the rejected options): a column's lse needs every row block's
contribution.  An online max/sum per column cannot be merged with atomics (the sum's
scale changes whenever the max does); per-row-block partials would need (N / BM) x N
floats; a second sweep on the transposed problem doubles the GEMM work.

Extra memory: the column bounds, sums and maxima (K floats each), and (splits x M)
partial (max, sum) pairs of the rows, merged on the host -- O(N), nothing N x N and
nothing (N / BM) x N.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import config as _config
from ..core.numerics import combine_diag
from .tile import block_descriptors, grouped_tile, tile_dot, tile_dot_desc

# log2(e) as a compile-time constant for the kernels (exp(x) = exp2(x * log2 e)).
_LOG2E_K = tl.constexpr(1.4426950408889634)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# The column shift's constants, derived in docs/numerics.md (csrc/numerics.h has the same):
# the Cauchy-Schwarz bound's slack, and the flag below which a column is recomputed exactly.
COL_SLACK = 1.0 + 2.0 ** -7
COL_UNDERFLOW = 2.0 ** -72


@triton.jit
def _two_exp_sums(s2, shift, m_new, row_ok, col_ok, EVEN_MK: tl.constexpr):
    """Steps 3 and 4 with one exp each (no sharing): column sums and online row sums."""
    # 4. Column terms with the fixed shift H2 - c2_j (padded rows zeroed, padded
    #    columns have c2 = +inf, i.e. shift = -inf) ...
    e = tl.exp2(s2 + shift[None, :])
    if not EVEN_MK:
        e = tl.where(row_ok[:, None], e, 0.0)
    col_part = tl.sum(e, axis=0)
    # 3. ... and the plain online row sum (padded columns -inf).
    if EVEN_MK:
        row_part = tl.sum(tl.exp2(s2 - m_new[:, None]), axis=1)
    else:
        row_part = tl.sum(tl.exp2(tl.where(col_ok[None, :], s2, float("-inf")) - m_new[:, None]), axis=1)
    return col_part, row_part


@triton.jit
def _col_max(s2, row_ok, EVEN_MK: tl.constexpr):
    """The tile's column maxima of S2 over its real rows."""
    if EVEN_MK:
        return tl.max(s2, axis=0)
    return tl.max(tl.where(row_ok[:, None], s2, float("-inf")), axis=0)


@triton.jit
def _shared_exp_sums(s2, shift, m_ref, c_max, row_ok, col_ok, SHARE_BUDGET: tl.constexpr,
                     EVEN_MK: tl.constexpr):
    """Steps 3 and 4 with ONE exp per element where docs/numerics.md section 5's condition
    holds for this tile, else the two-exp path: (col_part, row_part, 1 if shared else 0).

    Shared: e = 2^(S2 - mx) with mx the tile's largest row max; the row sums are
    2^(mx - m_i) * sum_j e_ij and the column sums 2^(mx + shift_j) * sum_i e_ij (BM + BN
    extra exps per tile).  The condition bounds the extra rounding of those arguments by
    SHARE_BUDGET x the rounding of the tile's largest |S2| in the materialised loss of the
    input dtype."""
    mx = tl.max(tl.where(row_ok, m_ref, float("-inf")), axis=0)
    mn = tl.min(tl.where(row_ok, m_ref, float("inf")), axis=0)
    c_lo = tl.min(tl.where(col_ok, c_max, float("inf")), axis=0)
    cf = mx + shift                                    # padded columns: -inf
    c_arg = tl.max(tl.where(col_ok, tl.abs(cf), 0.0), axis=0)
    ref = tl.maximum(1.0, tl.maximum(tl.max(tl.where(row_ok, tl.abs(m_ref), 0.0), axis=0),
                                     tl.max(tl.where(col_ok & (c_max > float("-inf")), tl.abs(c_max), 0.0),
                                            axis=0)))
    spread = (mx - mn) + (mx - c_lo)
    shared = (mx - mn <= 60.0) & (mx - c_lo <= 60.0) & (spread + c_arg <= SHARE_BUDGET * ref)
    if shared:
        if EVEN_MK:
            e = tl.exp2(s2 - mx)
        else:
            e = tl.exp2(tl.where(row_ok[:, None] & col_ok[None, :], s2, float("-inf")) - mx)
        row_part = tl.exp2(tl.where(row_ok, mx - m_ref, 0.0)) * tl.sum(e, axis=1)
        col_part = tl.exp2(cf) * tl.sum(e, axis=0)
    else:
        col_part, row_part = _two_exp_sums(s2, shift, m_ref, row_ok, col_ok, EVEN_MK)
    return col_part, row_part, shared


# The sweep of one work unit (a row block and one column range), longer than a screen on
# purpose: the tile loop is the whole sweep, and its numbered steps (module doc) read in order
# with every register's lifetime visible; the pieces that stand alone (tile_dot, _two_exp_sums)
# are separate jit functions.  Inlined into ``_lse_forward_kernel`` once (one unit per program)
# or inside its persistent loop.
@triton.jit
def _sweep_unit(
    pid_m, pid_s, img_ptr, txt_ptr, img_desc, txt_desc, c2_ptr, row_flag_ptr,
    m_part_ptr, l_part_ptr, col_sum_ptr, col_max_ptr, diag2_ptr, stats_ptr,
    M, K, D, H2, num_splits, scale2, bias2,
    stride_im, stride_id, stride_tk, stride_td,
    COMPUTE_COL: tl.constexpr, WRITE_DIAG: tl.constexpr,
    ROW_FLAGS: tl.constexpr, SHARE_EXP: tl.constexpr, SHARE_BUDGET: tl.constexpr,
    STATS: tl.constexpr, USE_TMA: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_MK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    offs_m = pid_m * BM + tl.arange(0, BM)
    row_ok = offs_m < M
    # 64-bit row offsets: N * D can exceed 2^31 elements.
    img_rows = img_ptr + offs_m.to(tl.int64)[:, None] * stride_im

    # This unit's column range: split pid_s of num_splits, in whole BN blocks.
    n_blocks = tl.cdiv(K, BN)
    per_split = tl.cdiv(n_blocks, num_splits)
    n_lo = pid_s * per_split * BN
    n_hi = tl.minimum(K, n_lo + per_split * BN)
    if ROW_FLAGS:
        # Fallback mode: only rows flagged by the caller are wanted; a block without
        # any flagged row does no work (empty column range).
        flags = tl.load(row_flag_ptr + offs_m, mask=row_ok, other=0)
        n_hi = tl.where(tl.max(flags, axis=0) > 0, n_hi, n_lo)

    m_i = tl.full((BM,), float("-inf"), tl.float32)   # running row max (log2 units)
    l_i = tl.zeros((BM,), tl.float32)                 # running row sum of exp2(S2 - m_i)
    for start_n in range(n_lo, n_hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        col_ok = offs_n < K
        txt_cols = txt_ptr + offs_n.to(tl.int64)[None, :] * stride_tk
        # 1. acc = img_blk @ txt_blk.T over D.  Masked loads: rows >= M and columns >= K
        #    read 0 (their S is then excluded below); features >= D read 0, adding nothing.
        if USE_TMA:
            acc = tile_dot_desc(img_desc, txt_desc, pid_m * BM, start_n, D, DOT_PRECISION,
                                DOT_UPCAST, BM, BN, BK)
        else:
            acc = tile_dot(img_rows, txt_cols, row_ok, col_ok, D, stride_id, stride_td,
                           EVEN_D, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)

        # 2. log2 units.
        s2 = acc * scale2 + bias2
        # 5. The diagonal, only on tiles whose column range meets this row block: S2_ii
        #    is written (log2 units, the very value the sums would have used) and then
        #    taken out of the sums (-inf); the host adds it back in float64.
        if (start_n < pid_m * BM + BM) & (start_n + BN > pid_m * BM):
            eq = offs_m[:, None] == offs_n[None, :]
            if WRITE_DIAG:
                dg = tl.sum(tl.where(eq, s2, 0.0), axis=1)
                on_tile = row_ok & (offs_m >= start_n) & (offs_m < start_n + BN) & (offs_m < K)
                tl.store(diag2_ptr + offs_m, dg, mask=on_tile)
            s2 = tl.where(eq, float("-inf"), s2)

        # Padded columns are excluded from the row max (-inf).  A row whose entries so far
        # are all -inf (its diagonal alone) keeps m = -inf; m_ref = 0 then keeps the
        # exponents finite (exp2(-inf - -inf) would be NaN).
        if EVEN_MK:
            m_tile = tl.max(s2, axis=1)
        else:
            m_tile = tl.max(tl.where(col_ok[None, :], s2, float("-inf")), axis=1)
        m_new = tl.maximum(m_i, m_tile)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)

        if COMPUTE_COL:
            # Column shift H2 - c2_j; padded columns: c2 = +inf makes their term 0.
            c2 = tl.load(c2_ptr + offs_n, mask=col_ok, other=float("inf"))
            shift = H2 - c2
            if SHARE_EXP:
                # The column maxima (step 4b) first: the sharing test reads their spread.
                c_max = _col_max(s2, row_ok, EVEN_MK)
                col_part, row_part, shared = _shared_exp_sums(
                    s2, shift, m_ref, c_max, row_ok, col_ok, SHARE_BUDGET, EVEN_MK)
                if STATS:
                    tl.atomic_add(stats_ptr, shared.to(tl.int32), sem="relaxed")
            else:
                col_part, row_part = _two_exp_sums(s2, shift, m_ref, row_ok, col_ok, EVEN_MK)
            # 4. One relaxed atomic add per column merges this row block's sums.
            tl.atomic_add(col_sum_ptr + offs_n, col_part, mask=col_ok, sem="relaxed")
            # 4b. The column maxima (one relaxed atomic max per column): the host writes
            #     each column's lse relative to its largest S2, so the backward's
            #     recomputed S2 gives exactly P = 1 for a column's dominant entry.
            if not SHARE_EXP:
                # After the atomic add, so that c_max is not live across it (sm_90: 186
                # registers instead of 239; aot_check).
                c_max = _col_max(s2, row_ok, EVEN_MK)
            tl.atomic_max(col_max_ptr + offs_n, c_max, mask=col_ok, sem="relaxed")
        else:
            # 3. Plain online row sum.
            if EVEN_MK:
                row_part = tl.sum(tl.exp2(s2 - m_ref[:, None]), axis=1)
            else:
                row_part = tl.sum(tl.exp2(tl.where(col_ok[None, :], s2, float("-inf"))
                                          - m_ref[:, None]), axis=1)
        l_i = l_i * alpha + row_part
        m_i = m_new

    # This column range's (max, sum) of the row's off-diagonal entries, merged on the host.
    tl.store(m_part_ptr + pid_s * M + offs_m, m_i, mask=row_ok)
    tl.store(l_part_ptr + pid_s * M + offs_m, l_i, mask=row_ok)


@triton.jit
def _lse_forward_kernel(
    img_ptr, txt_ptr, scale_ptr, bias_ptr, c2_ptr, row_flag_ptr,
    m_part_ptr, l_part_ptr, col_sum_ptr, col_max_ptr, diag2_ptr, stats_ptr,
    M, K, D, H2, num_splits, num_programs,
    stride_im, stride_id, stride_tk, stride_td,
    HAS_BIAS: tl.constexpr, COMPUTE_COL: tl.constexpr, WRITE_DIAG: tl.constexpr,
    ROW_FLAGS: tl.constexpr, SHARE_EXP: tl.constexpr, SHARE_BUDGET: tl.constexpr,
    STATS: tl.constexpr, USE_TMA: tl.constexpr, PERSISTENT: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_MK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    # EVEN_D: D % BK == 0 (no feature masks); EVEN_MK: M % BM == 0 and K % BN == 0 (no
    # padded rows or columns, so the tile-wide masking selects are compiled out).
    scale = tl.load(scale_ptr).to(tl.float32)
    scale2 = scale * _LOG2E_K
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    else:
        bias = 0.0
    bias2 = bias * _LOG2E_K
    # Tensor descriptors (USE_TMA: TMA loads on sm_90; unit feature stride, 16-byte aligned rows),
    # made once per program.
    img_desc, txt_desc = block_descriptors(img_ptr, txt_ptr, M, K, D, stride_im, stride_tk, USE_TMA, BM, BN, BK)
    if PERSISTENT:
        # A persistent grid of num_programs programs walks the work units (row block x
        # column split) with stride num_programs, in the grouped order of ``grouped_tile``:
        # GROUP_M row blocks' units are consecutive, so the programs running at one time
        # share their img blocks and txt strips in L2.
        row_blocks = tl.cdiv(M, BM)
        for unit in tl.range(tl.program_id(0), row_blocks * num_splits, num_programs):
            pid_m, pid_s = grouped_tile(unit, row_blocks, num_splits, GROUP_M)
            _sweep_unit(pid_m, pid_s, img_ptr, txt_ptr, img_desc, txt_desc, c2_ptr, row_flag_ptr,
                        m_part_ptr, l_part_ptr, col_sum_ptr, col_max_ptr, diag2_ptr, stats_ptr,
                        M, K, D, H2, num_splits, scale2, bias2,
                        stride_im, stride_id, stride_tk, stride_td,
                        COMPUTE_COL, WRITE_DIAG, ROW_FLAGS, SHARE_EXP, SHARE_BUDGET, STATS, USE_TMA,
                        EVEN_D, EVEN_MK, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)
    else:
        # One unit per program: grid (row blocks, column splits).
        _sweep_unit(tl.program_id(0), tl.program_id(1), img_ptr, txt_ptr, img_desc, txt_desc,
                    c2_ptr, row_flag_ptr, m_part_ptr, l_part_ptr, col_sum_ptr, col_max_ptr,
                    diag2_ptr, stats_ptr, M, K, D, H2, num_splits, scale2, bias2,
                    stride_im, stride_id, stride_tk, stride_td,
                    COMPUTE_COL, WRITE_DIAG, ROW_FLAGS, SHARE_EXP, SHARE_BUDGET, STATS, USE_TMA,
                    EVEN_D, EVEN_MK, DOT_PRECISION, DOT_UPCAST, BM, BN, BK)


_autotuned = None


def _kernel(autotune: bool):
    """The plain kernel, or (CLIP_FAST_AUTOTUNE=1) its autotuned wrapper."""
    global _autotuned
    if not autotune:
        return _lse_forward_kernel
    if _autotuned is None:
        _autotuned = triton.autotune(
            configs=_config.autotune_candidates("forward"),
            key=["M", "K", "D", "COMPUTE_COL"],
            # The atomics accumulate: restore the column sums after each trial run so the
            # final launch adds to what was there before tuning.
            restore_value=["col_sum_ptr", "col_max_ptr"],
        )(_lse_forward_kernel)
    return _autotuned


def _wrap(kernel):
    """wrap_triton for torch.compile; the interpreter's kernels are launched as they are
    (older torch rejects an InterpretedFunction in wrap_triton)."""
    return kernel if _config.interpreter_active() else wrap_triton(kernel)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# Exponent sharing's precision budget (docs/numerics.md section 5): the extra rounding a
# shared exponential adds, in units of the float32 rounding of the tile's logits, that a tile
# may take.  Scaled by the input dtype's unit over float32's, since the precision rule
# compares with the materialised loss in that dtype (whose logits round at that unit).
SHARE_KAPPA = 2.0
_DTYPE_UNIT_OVER_FP32 = {torch.float32: 1.0, torch.float16: 2.0 ** 13, torch.bfloat16: 2.0 ** 16}

# Test hook: an int32 counter that every shared tile increments (None: not counted).
_share_counter: Optional[torch.Tensor] = None


def share_budget(dtype: torch.dtype) -> float:
    """SHARE_BUDGET for inputs of ``dtype``: SHARE_KAPPA x (the dtype's unit / float32's)."""
    return SHARE_KAPPA * _DTYPE_UNIT_OVER_FP32.get(dtype, 1.0)


class count_shared_tiles:
    """``with count_shared_tiles() as n:`` -- n[0] counts the tiles that shared one exp."""

    def __init__(self, device="cpu"):
        self.device = device

    def __enter__(self):
        global _share_counter
        self.previous = _share_counter
        self.counter = torch.zeros((1,), dtype=torch.int32, device=self.device)
        _share_counter = self.counter
        return self.counter

    def __exit__(self, *exc):
        global _share_counter
        _share_counter = self.previous


def use_tma(cfg, img: torch.Tensor, txt: torch.Tensor) -> bool:
    """Whether the sweep loads its tiles through tensor descriptors: the variant asks for it
    (``Configs.use_tma``), the GPU is sm_90 or newer (the interpreter runs descriptors too), and
    the layout allows TMA (unit feature stride, 16-byte aligned bases and row strides)."""
    if not cfg.use_tma:
        return False
    if img.device.type == "cuda" and torch.cuda.get_device_capability(img.device)[0] < 9:
        return False
    for t in (img, txt):
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    _set_descriptor_allocator()
    return True


def _set_descriptor_allocator() -> None:
    """Device-side descriptors need a global scratch buffer per launch, from Triton's allocator."""
    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")

    triton.set_allocator(alloc)


def launch_options(cfg) -> dict:
    """Compile options a variant adds to a tile kernel's launch (``maxnreg``)."""
    return {"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}


def headroom_log2(M: int) -> float:
    """H2: the shift headroom (log2 units) for column sums over M rows (docs/numerics.md)."""
    return float(min(100, 122 - math.ceil(math.log2(M + 1))))


def _launch(img, txt, scale, bias, *, c2, row_flags, col_sum, col_max, diag2,
            compute_col: bool, H2: float) -> torch.Tensor:
    """Sweep img's rows against txt's rows; returns each row's off-diagonal log-sum-exp in
    log2 units (float64) and fills ``col_sum``, ``col_max`` and ``diag2`` when given."""
    M, D = img.shape
    K = txt.shape[0]
    cfg = _config.get_configs(img.device, img.dtype)
    fwd = cfg.forward
    autotune = _config.autotune_enabled()
    bm = 128 if autotune else fwd.BM
    # Split the column sweep when the row blocks cannot fill the GPU (2 programs/SM).
    row_blocks = triton.cdiv(M, bm)
    splits = cfg.col_splits
    if splits is None:
        target = 2 * _num_sms(img.device)
        splits = max(1, min(16, triton.cdiv(target, row_blocks), triton.cdiv(K, 256)))
    if row_flags is not None:
        splits = 1
    # Unused pointer arguments get their own 1-element dummies: no tensor is passed twice,
    # which keeps torch.compile's mutation analysis of the launch simple.
    def dummy(dtype=torch.float32):
        return torch.empty((1,), device=img.device, dtype=dtype)

    m_part = torch.empty((splits, M), device=img.device, dtype=torch.float32)
    l_part = torch.empty((splits, M), device=img.device, dtype=torch.float32)
    # Persistent grid (config.Configs.persistent programs per SM, never more than the units),
    # with the descriptor loads only: the compiled and tested pairing (aot_variants).
    tma = use_tma(cfg, img, txt)
    units = row_blocks * splits
    programs = min(units, cfg.persistent * _num_sms(img.device)) if cfg.persistent and tma and not autotune else 0
    args = dict(
        M=M, K=K, D=D, H2=H2, num_splits=splits, num_programs=max(programs, 1),
        stride_im=img.stride(0), stride_id=img.stride(1),
        stride_tk=txt.stride(0), stride_td=txt.stride(1),
        HAS_BIAS=bias is not None, COMPUTE_COL=compute_col, WRITE_DIAG=diag2 is not None,
        ROW_FLAGS=row_flags is not None,
        SHARE_EXP=bool(cfg.share_exp) and compute_col,
        SHARE_BUDGET=share_budget(img.dtype),
        STATS=_share_counter is not None,
        USE_TMA=tma, PERSISTENT=programs > 0, GROUP_M=8,
        DOT_PRECISION=_config.dot_precision(img.dtype),
        DOT_UPCAST=_config.interpreter_active() and img.dtype == torch.bfloat16,
    )
    ptrs = (img, txt, scale, bias if bias is not None else dummy(),
            c2 if c2 is not None else dummy(),
            row_flags if row_flags is not None else dummy(torch.int32),
            m_part, l_part, col_sum if col_sum is not None else dummy(),
            col_max if col_max is not None else dummy(),
            diag2 if diag2 is not None else dummy(),
            _share_counter if _share_counter is not None else dummy(torch.int32))
    if autotune:
        grid = lambda meta: (triton.cdiv(M, meta["BM"]), splits)  # noqa: E731
        args["EVEN_D"] = False
        args["EVEN_MK"] = False
        _wrap(_kernel(True))[grid](*ptrs, **args)
    else:
        args["EVEN_D"] = D % fwd.BK == 0
        args["EVEN_MK"] = M % fwd.BM == 0 and K % fwd.BN == 0
        _wrap(_kernel(False))[(programs,) if programs else (row_blocks, splits)](
            *ptrs, **args, BM=fwd.BM, BN=fwd.BN, BK=fwd.BK,
            num_warps=fwd.num_warps, num_stages=fwd.num_stages, **launch_options(cfg))
    return merge_log2_parts(m_part, l_part)


def merge_log2_parts(m_part: torch.Tensor, l_part: torch.Tensor) -> torch.Tensor:
    """log2 sum_s l_s 2^m_s over the splits (dim 0), in float64; -inf where every l_s is 0."""
    m = m_part.to(torch.float64).amax(dim=0)
    ref = torch.where(m == float("-inf"), 0.0, m)
    total = (l_part.to(torch.float64) * torch.exp2(m_part.to(torch.float64) - ref)).sum(dim=0)
    return ref + torch.log2(total)


def _lse_forward_impl(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    row_off, col_off, diag = lse_forward_offdiag(img, txt, scale, bias)
    return combine_diag(row_off, diag), combine_diag(col_off, diag), diag


def lse_forward_offdiag(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sweep before the diagonal is added back: off-diagonal row and column log-sum-exp
    (float64, -inf where a row or column has no off-diagonal entry) and the diagonal."""
    M, D = img.shape
    K = txt.shape[0]
    n = min(M, K)
    dev = img.device
    f32, f64 = torch.float32, torch.float64
    if M == 0 or K == 0:
        return (torch.full((M,), float("-inf"), device=dev, dtype=f64),
                torch.full((K,), float("-inf"), device=dev, dtype=f64), torch.empty((0,), device=dev, dtype=f64))

    # Pre-pass, O(N*D): the column bounds c2_j (log2 units) -- module doc.
    c2 = column_bounds_log2(img, txt, scale, bias)
    H2 = headroom_log2(M)

    # The sweep: off-diagonal row lse, shifted off-diagonal column sums, the diagonal.
    col_sum = torch.zeros((K,), device=dev, dtype=f32)
    col_max = torch.full((K,), float("-inf"), device=dev, dtype=f32)
    diag2 = torch.empty((n,), device=dev, dtype=f32)
    row_off2 = _launch(img, txt, scale, bias, c2=c2, row_flags=None, col_sum=col_sum,
                       col_max=col_max, diag2=diag2, compute_col=True, H2=H2)
    # Column lse relative to the column's largest S2 (the kernel's own fp32 values):
    # col_sum holds 2^(x_i) with x_i = fl(S2_ij + shift_j), shift_j = H2 - c2_j in fp32 (H2
    # is an integer, so this is the kernel's shift bit for bit), and the dominant term is
    # 2^(fl(col_max + shift)).  So lse = col_max + log2(col_sum / 2^fl(col_max + shift)):
    # a dominated column gets col_max + (tiny), not col_max + (rounding of |S2 + shift|).
    shift = c2.new_full((), H2) - c2
    top = (col_max + shift).to(f64)
    col_off2 = torch.where(col_max == float("-inf"), col_max.to(f64),
                           col_max.to(f64) + torch.log2(col_sum.to(f64)) - top)
    shift2 = shift.to(f64)

    # Exact fallback for columns whose whole sum (off-diagonal part plus the diagonal's own
    # shifted term) underflowed: always launched, a no-op when none is flagged.
    total = col_sum.to(f64)
    total[:n] += torch.exp2(diag2.to(f64) + shift2[:n])
    flags = (total < COL_UNDERFLOW) | ~torch.isfinite(total)
    exact2 = _launch(txt, img, scale, bias, c2=None, row_flags=flags.to(torch.int32), col_sum=None,
                     col_max=None, diag2=None, compute_col=False, H2=H2)
    col_off2 = torch.where(flags, exact2, col_off2)

    diag = diag2.to(f64) * LN2
    return row_off2 * LN2, col_off2 * LN2, diag


def column_bounds_log2(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    """c2_j = log2(e) * (|s| |txt_j| max_i |img_i| (1 + 2^-7) + b) >= S2_ij: the fixed column shifts."""
    f32 = torch.float32
    txt_norm = torch.linalg.vector_norm(txt, dim=1, dtype=f32)
    img_norm_max = torch.linalg.vector_norm(img, dim=1, dtype=f32).amax()
    c = scale.abs().to(f32) * txt_norm * img_norm_max * COL_SLACK
    if bias is not None:
        c = c + bias.to(f32)
    return (c * LOG2E).contiguous()


if _config.interpreter_active():
    # The interpreter's kernels cannot run on fake tensors, so under TRITON_INTERPRET=1
    # the op is an opaque custom_op with a fake implementation (torch.compile still
    # captures it without a graph break; CI tests that on CPU).
    triton_lse_forward = torch.library.custom_op(
        "clip_fast::triton_lse_forward", mutates_args=())(_lse_forward_impl)

    @triton_lse_forward.register_fake
    def _(img, txt, scale, bias):
        M, K = img.shape[0], txt.shape[0]
        return (img.new_empty((M,), dtype=torch.float64), img.new_empty((K,), dtype=torch.float64),
                img.new_empty((min(M, K),), dtype=torch.float64))
else:
    # On GPU: a triton_op, so torch.compile traces through it and sees the kernels.
    triton_lse_forward = triton_op("clip_fast::triton_lse_forward", mutates_args={})(_lse_forward_impl)


def lse_forward(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None):
    """(lse_row, lse_col, diag) of S = scale * img @ txt.T + bias; see the module doc."""
    return torch.ops.clip_fast.triton_lse_forward(img, txt, scale, bias)


def aot_variants(dtype: torch.dtype, arch: int):
    """The compile variants of ``_lse_forward_kernel`` (``python -m clip_fast.kernels.aot_check``)."""
    prec = "tf32" if dtype == torch.float32 else "ieee"
    # The production default: two exponentials per element (config.Configs.share_exp).
    base = dict(HAS_BIAS=False, COMPUTE_COL=True, WRITE_DIAG=True, ROW_FLAGS=False,
                SHARE_EXP=False, SHARE_BUDGET=share_budget(dtype), STATS=False, USE_TMA=False,
                PERSISTENT=False, GROUP_M=8, EVEN_D=True, EVEN_MK=True, DOT_PRECISION=prec, DOT_UPCAST=False,
                stride_id=1, stride_td=1)
    variants = [("sweep", base),
                ("sweep padded odd-D bias", dict(base, EVEN_MK=False, EVEN_D=False, HAS_BIAS=True)),
                ("sweep shared-exp", dict(base, SHARE_EXP=True)),
                ("fallback", dict(base, COMPUTE_COL=False, WRITE_DIAG=False, ROW_FLAGS=True, EVEN_MK=False))]
    if dtype == torch.float32:
        variants.append(("sweep ieee", dict(base, DOT_PRECISION="ieee")))
    feat = _config.feature_ptr(dtype)
    ints = frozenset({"M", "K", "D", "num_splits", "num_programs", "stride_im", "stride_tk"})
    table = _config.table_configs(arch // 10, dtype).forward
    tiles = {name: table for name, _ in variants}
    # The fused-backward variants run both sweeps at their own tile (config.VARIANT_TILES).
    fused = _config.VARIANT_TILES["fused_bwd"]
    fused = _config.KernelConfig(fused.BM, fused.BN, min(fused.BK, table.BK), fused.num_warps, fused.num_stages)
    for name, ce in (("sweep fused_bwd tile", base), ("sweep shared-exp fused_bwd tile", dict(base, SHARE_EXP=True))):
        variants.append((name, ce))
        tiles[name] = fused
    options = {}
    if arch >= 90:   # the TMA variants are Hopper's ("tma", "tma_persistent" in config.VARIANTS)
        for name, ce in (("sweep tma", dict(base, USE_TMA=True)),
                         ("sweep tma persistent", dict(base, USE_TMA=True, PERSISTENT=True))):
            variants.append((name, ce))
            tiles[name] = table
    # "regs128" (config.VARIANTS): its tile, ptxas capped at 128 registers for two CTAs per SM.
    regs = _config.VARIANT_TILES["regs128"]
    variants.append(("sweep regs128", base))
    tiles["sweep regs128"] = _config.KernelConfig(regs.BM, regs.BN, min(regs.BK, table.BK),
                                                  regs.num_warps, regs.num_stages)
    options["sweep regs128"] = (("maxnreg", _config.VARIANTS["regs128"]["maxnreg"]),)
    for name, ce in variants:
        yield _config.AotVariant(
            "forward", name, _lse_forward_kernel, tiles[name], ce,
            ints=ints, div16=ints - {"num_splits", "num_programs"}, floats=frozenset({"H2"}),
            pointers=(("img_ptr", feat), ("txt_ptr", feat), ("row_flag_ptr", "*i32"),
                      ("stats_ptr", "*i32")), options=options.get(name, ()))
