"""The tile recompute shared by the forward and backward kernels.

``tile_dot`` returns ``acc = img_blk @ txt_blk.T`` (BM x BN, fp32) for one tile of S,
looping over D in BK slices.  It is a plain ``@triton.jit`` function: Triton inlines
it into each kernel that calls it, with the caller's compile-time flags.
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
