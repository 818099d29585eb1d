"""The tile recompute shared by the forward and backward kernels.

``tile_dot`` returns ``acc = img_blk @ txt_blk.T`` (BM x BN, fp32) for one tile of S,
looping over D in BK slices.  It is a plain ``@triton.jit`` function: Triton inlines
it into each kernel that calls it, with the caller's compile-time flags.

``grouped_tile`` maps a linear tile (or work unit) index to its grouped (row, column) position,
for the grouped launch order and the persistent grids.

``two_exp_g`` and ``shared_exp_g`` turn a tile of S (in log2 units) into G's softmax part,
coef_row P_row + coef_col P_col, for both backward designs (``grad_backward``'s workspace and
``fused_backward``'s on-chip one).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_dot(img_rows, txt_cols, row_ok, col_ok, D, stride_id, stride_td,
             EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """acc = img_blk @ txt_blk.T in fp32 over D.

    img_rows: (BM, 1) pointers to the tile's img rows; txt_cols: (1, BN) pointers to its
    txt rows (the columns of S); row_ok / col_ok: which of them exist.  Masked loads:
    rows and columns that do not exist read 0 (the caller masks their S); with
    EVEN_D False (D % BK != 0) features >= D also read 0, adding nothing.
    """
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for start_d in range(0, D, BK):
        d = start_d + offs_k
        if EVEN_D:
            a = tl.load(img_rows + d[None, :] * stride_id, mask=row_ok[:, None], other=0.0)
            b = tl.load(txt_cols + d[:, None] * stride_td, mask=col_ok[None, :], other=0.0)
        else:
            a = tl.load(img_rows + d[None, :] * stride_id,
                        mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
            b = tl.load(txt_cols + d[:, None] * stride_td,
                        mask=col_ok[None, :] & (d[:, None] < D), other=0.0)
        if DOT_UPCAST:
            # Interpreter only: its bf16 tl.dot is broken; bf16 -> fp32 is exact.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        # input_precision passed explicitly: Triton's fp32 default changed across versions.
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of ``tile_id`` in the grouped order of Triton's matmul tutorials: tiles
    come GROUP_M rows at a time, column by column within the group, so the programs running
    at one time read GROUP_M row blocks and a few column blocks, which L2 then holds.  A
    bijection of [0, num_pid_m * num_pid_n) (tests/kernels/test_variants.py checks it)."""
    group = GROUP_M * num_pid_n
    first_m = (tile_id // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group) % group_size
    pid_n = (tile_id % group) // group_size
    return pid_m, pid_n


@triton.jit
def block_descriptors(img_ptr, txt_ptr, rows, cols, D, stride_im, stride_tk, USE_TMA: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """(img_desc, txt_desc) for ``tile_dot_desc``: tensor descriptors (TMA loads on sm_90) over rows
    [0, rows) of img and [0, cols) of txt, whose zero padding past those rows and past D gives the
    masked loads' zeros; without USE_TMA the pointers themselves (the descriptors unused)."""
    if USE_TMA:
        img_desc = tl.make_tensor_descriptor(img_ptr, shape=[rows, D], strides=[stride_im, 1],
                                             block_shape=[BM, BK])
        txt_desc = tl.make_tensor_descriptor(txt_ptr, shape=[cols, D], strides=[stride_tk, 1],
                                             block_shape=[BN, BK])
    else:
        img_desc = img_ptr
        txt_desc = txt_ptr
    return img_desc, txt_desc


@triton.jit
def block_tile(tile_id, row0, col0, R, C, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile ``tile_id`` (grouped order) of the R x C block at (row0, col0) of S: its rows and
    columns inside the block (offs_r, offs_c) and in S (offs_m, offs_n), and which exist."""
    pid_m, pid_n = grouped_tile(tile_id, tl.cdiv(R, BM), tl.cdiv(C, BN), GROUP_M)
    offs_r = pid_m * BM + tl.arange(0, BM)
    offs_c = pid_n * BN + tl.arange(0, BN)
    return offs_r, offs_c, row0 + offs_r, col0 + offs_c, offs_r < R, offs_c < C


@triton.jit
def tile_dot_desc(img_desc, txt_desc, off_m, off_n, D, DOT_PRECISION: tl.constexpr,
                  DOT_UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``tile_dot`` through tensor descriptors (TMA loads on sm_90): the BM x BK and BN x BK
    blocks at rows off_m of img and off_n of txt, D in BK slices.  The descriptors pad rows and
    features out of range with 0, as ``tile_dot``'s masks do, so the sums are the same."""
    acc = tl.zeros((BM, BN), tl.float32)
    for start_d in range(0, D, BK):
        a = img_desc.load([off_m, start_d])
        b = txt_desc.load([off_n, start_d])
        if DOT_UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def two_exp_g(s2, r_hi, r_lo, c_hi, c_lo, coef_row, coef_col):
    """coef_row P_row + coef_col P_col with one exp per softmax (lse as float-float pairs)."""
    return (coef_row * tl.exp2((s2 - r_hi[:, None]) - r_lo[:, None])
            + coef_col * tl.exp2((s2 - c_hi[None, :]) - c_lo[None, :]))


@triton.jit
def shared_exp_g(s2, r_hi, r_lo, c_hi, c_lo, row_ok, col_ok, coef_row, coef_col,
                 SHARE_BUDGET: tl.constexpr):
    """coef_row P_row + coef_col P_col from ONE exp per element where docs/numerics.md
    section 5's condition holds for this tile (else ``two_exp_g``): with hi the tile's
    largest lse, G = 2^(S2 - hi) * (coef_row u_i + coef_col v_j).  The shared argument
    rounds up to (hi - lo) more than the per-softmax ones; the tile shares only when that,
    plus the three roundings of the factors, is within SHARE_BUDGET x the rounding of its
    largest |lse| (at least 1)."""
    hi = tl.maximum(tl.max(tl.where(row_ok, r_hi, float("-inf")), axis=0),
                    tl.max(tl.where(col_ok, c_hi, float("-inf")), axis=0))
    lo = tl.minimum(tl.min(tl.where(row_ok, r_hi, float("inf")), axis=0),
                    tl.min(tl.where(col_ok, c_hi, float("inf")), axis=0))
    ref = tl.maximum(1.0, tl.maximum(tl.max(tl.where(row_ok, tl.abs(r_hi), 0.0), axis=0),
                                     tl.max(tl.where(col_ok, tl.abs(c_hi), 0.0), axis=0)))
    if (hi - lo <= 60.0) & ((hi - lo) + 3.0 <= SHARE_BUDGET * ref):
        u = coef_row * tl.exp2(tl.where(row_ok, (hi - r_hi) - r_lo, 0.0))
        v = coef_col * tl.exp2(tl.where(col_ok, (hi - c_hi) - c_lo, 0.0))
        g = tl.exp2(s2 - hi) * (u[:, None] + v[None, :])
    else:
        g = two_exp_g(s2, r_hi, r_lo, c_hi, c_lo, coef_row, coef_col)
    return g


@triton.jit
def tile_dot_range(acc, img_rows, txt_cols, row_ok, col_ok, d0, d1, stride_id, stride_td,
                   DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BK: tl.constexpr):
    """acc + img_blk[:, d0:d1] @ txt_blk[:, d0:d1].T in acc's dtype (fp32; fp64 for float64
    operands, which triton 3.6 accepts only with that out_dtype named): ``tile_dot`` over the
    features d0 <= d < d1 (loads masked at d1), the running partial sum of a nested (Matryoshka)
    sweep whose size boundaries need not be multiples of BK."""
    offs_k = tl.arange(0, BK)
    for start_d in range(d0, d1, BK):
        d = start_d + offs_k
        a = tl.load(img_rows + d[None, :] * stride_id, mask=row_ok[:, None] & (d[None, :] < d1), other=0.0)
        b = tl.load(txt_cols + d[:, None] * stride_td, mask=col_ok[None, :] & (d[:, None] < d1), other=0.0)
        if DOT_UPCAST:  # interpreter only (``tile_dot``)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    return acc
