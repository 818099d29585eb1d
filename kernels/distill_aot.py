"""Compile the distillation kernels (``kernels/distill.py``) for sm_80 / sm_90 without a GPU.

    python -m clip_fast.kernels.distill_aot [--arch 90 80] [--dtype bf16 fp32] [--tile BM,BN,BK,warps,stages]

Uses ``aot_check``'s compiler driver (Triton's full pipeline to PTX for an explicit target,
then ptxas) on every variant at the tile ``distill.tile_config`` picks, and prints registers,
spill stores and shared memory.  Exit status 1 if a variant fails to compile or spills.
Measures nothing about speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from . import aot_check as _aot
from .config import KernelConfig
from .distill import GPU_TILE, _distill_backward_kernel, _distill_forward_kernel

_INTS_FWD = {"M", "K", "D", "TD", "stride_im", "stride_tk", "stride_sm", "stride_uk"}
_INTS_BWD = {"row0", "col0", "R", "C", "D", "TD", "stride_im", "stride_tk", "stride_sm", "stride_uk", "stride_wr"}


def variants():
    """(name, kernel, constexpr flags, integer args, float args, float64 pointers)."""
    fwd = dict(HAS_ROW=True, HAS_COL=True, EVEN_D=True, EVEN_TD=True)
    bwd = dict(fwd, TEACHER=True)
    yield "forward", _distill_forward_kernel, fwd, _INTS_FWD, set(), ()
    yield "forward row-only odd-D", _distill_forward_kernel, dict(fwd, HAS_COL=False, EVEN_D=False, EVEN_TD=False), \
        _INTS_FWD, set(), ()
    f64 = ("d_scale_ptr", "d_tscale_ptr")
    yield "backward", _distill_backward_kernel, bwd, _INTS_BWD, {"coef_row", "coef_col"}, f64
    yield "backward frozen-teacher", _distill_backward_kernel, dict(bwd, TEACHER=False), _INTS_BWD, \
        {"coef_row", "coef_col"}, f64
    yield "backward column-only odd-D", _distill_backward_kernel, \
        dict(bwd, HAS_ROW=False, EVEN_D=False, EVEN_TD=False), _INTS_BWD, {"coef_row", "coef_col"}, f64


def check(arch: int, dtype: torch.dtype, tile=GPU_TILE) -> int:
    cfg = tile if dtype != torch.float32 else dataclasses.replace(tile, BK=min(tile.BK, 32))
    tdt = "*" + _aot._TRITON_DTYPE[dtype]
    prec = "tf32" if dtype == torch.float32 else "ieee"
    failures = 0
    for name, fn, flags, ints, floats, f64 in variants():
        ptrs = {n: "*fp32" for n in fn.arg_names if n.endswith("_ptr")}
        ptrs.update(img_ptr=tdt, txt_ptr=tdt, timg_ptr=tdt, ttxt_ptr=tdt, **{p: "*fp64" for p in f64})
        ce = dict(flags, DOT_PRECISION=prec, DOT_UPCAST=False, stride_id=1, stride_td=1, stride_sd=1, stride_ud=1)
        label = f"sm_{arch} {_aot._TRITON_DTYPE[dtype]:4s} {name:28s} {cfg}"
        try:
            k = _aot._compile(fn, ptrs, ints=ints, floats=floats, constexprs=ce, div16=ints, cfg=cfg, arch=arch)
        except Exception as exc:  # report and keep going
            failures += 1
            print(f"{label}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        usage = _aot._ptxas_usage(k.asm["ptx"], arch)
        spill = usage["spill"] if usage else "?"
        spilled = any(int(x) for x in spill.split(",") if x.isdigit())
        failures += spilled
        print(f"{label}: regs={usage['regs'] if usage else '?'} spill_stores={spill}B smem={k.metadata.shared}"
              f"{' SPILLS' if spilled else ''}", flush=True)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--tile", default=None, help="BM,BN,BK,warps,stages instead of distill.GPU_TILE")
    args = parser.parse_args(argv)
    dtypes = [{"bf16": torch.bfloat16, "fp32": torch.float32}[d] for d in args.dtype]
    tile = GPU_TILE if args.tile is None else KernelConfig(*(int(x) for x in args.tile.split(",")))
    failures = sum(check(arch, dtype, tile) for arch in args.arch for dtype in dtypes)
    print(f"distill_aot: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
