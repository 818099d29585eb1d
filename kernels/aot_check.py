"""Compile every kernel variant for sm_80 / sm_90 without a GPU and report ptxas usage.

    python -m clip_fast.kernels.aot_check [--arch 90 80] [--configs "128,128,64,8,3;..."]

Runs Triton's full compiler (TTIR -> TTGIR -> LLVM -> PTX) for an explicit target and
then the ptxas bundled with Triton on the PTX, so kernel code that only fails in
compiled mode (types across branches, layouts, shared memory) is caught on a CPU-only
machine.  Integer arguments get the specialisations Triton gives them at run time for
contiguous inputs (unit feature stride as a constant, 16-divisible sizes/strides), so
the software pipelining and the register/spill figures are those of a real launch.
It measures nothing about speed.  Exit status 1 if any variant fails to compile.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import config as _config
from .grad_backward import _grad_tile_kernel
from .lse_forward import _lse_forward_kernel

_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _ptxas_report(ptx: str, arch: int) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return "ptxas not found"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        name = "sm_90a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([ptxas, "-v", f"-arch={name}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, timeout=300).stderr
    finally:
        os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill stores", out)
    return f"regs={','.join(regs) or '?'} spill_stores={','.join(spills) or '?'}B"


def _compile(fn, ptr_types, ints, floats, constexprs, div16, cfg, arch):
    ce = dict(constexprs, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK)
    sig = {}
    for name in fn.arg_names:
        if name in ce:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
        elif name in ints:
            sig[name] = "i32"
        elif name in floats:
            sig[name] = "fp32"
        else:
            raise KeyError(f"no type for argument {name}")
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in fn.arg_names if n in ptr_types or n in div16}
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in ce.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def forward_variants(dtype):
    prec = "tf32" if dtype == torch.float32 else "ieee"
    # The production default: two exponentials per element (config.Configs.share_exp).
    base = dict(HAS_BIAS=False, COMPUTE_COL=True, WRITE_DIAG=True, ROW_FLAGS=False,
                SHARE_EXP=False, EVEN_D=True, EVEN_MK=True, DOT_PRECISION=prec, DOT_UPCAST=False)
    yield "sweep", base
    yield "sweep padded odd-D bias", dict(base, EVEN_MK=False, EVEN_D=False, HAS_BIAS=True)
    yield "sweep shared-exp", dict(base, SHARE_EXP=True)
    yield "fallback", dict(base, COMPUTE_COL=False, WRITE_DIAG=False, ROW_FLAGS=True, SHARE_EXP=False,
                           EVEN_MK=False)
    if dtype == torch.float32:
        yield "sweep ieee", dict(base, DOT_PRECISION="ieee")


def backward_variants(dtype):
    prec = "tf32" if dtype == torch.float32 else "ieee"
    base = dict(HAS_BIAS=False, HAS_ROW=True, HAS_COL=True, HAS_DIAG=True, G_DIAG=True,
                SHARE_EXP=False, EVEN_D=True, DOT_PRECISION=prec, DOT_UPCAST=False, GROUP_M=8)
    yield "tile", base
    yield "tile coef-diag bias odd-D", dict(base, G_DIAG=False, HAS_BIAS=True, EVEN_D=False)
    yield "tile shared-exp", dict(base, SHARE_EXP=True)
    yield "tile row-only", dict(base, HAS_COL=False)


def check(arch: int, dtype: torch.dtype, fwd_cfg, bwd_cfg) -> int:
    failures = 0
    tdt = "*" + _TRITON_DTYPE[dtype]
    # Forward.
    ptrs = {n: "*fp32" for n in _lse_forward_kernel.arg_names if n.endswith("_ptr")}
    ptrs.update(img_ptr=tdt, txt_ptr=tdt, row_flag_ptr="*i32")
    for name, ce in forward_variants(dtype):
        ce = dict(ce, stride_id=1, stride_td=1)
        t0 = time.time()
        try:
            k = _compile(_lse_forward_kernel, ptrs,
                         ints={"M", "K", "D", "num_splits", "stride_im", "stride_tk"},
                         floats={"H2"}, constexprs=ce,
                         div16={"M", "K", "D", "stride_im", "stride_tk"}, cfg=fwd_cfg, arch=arch)
            smem = k.metadata.shared
            over = " OVER LIMIT" if smem > _SMEM_LIMIT.get(arch, 1 << 30) else ""
            print(f"sm_{arch} {_TRITON_DTYPE[dtype]:4s} forward  {fwd_cfg} {name:26s} "
                  f"{_ptxas_report(k.asm['ptx'], arch)} smem={smem}{over} ({time.time() - t0:.1f}s)",
                  flush=True)
            failures += bool(over)
        except Exception as exc:  # report and keep going
            failures += 1
            print(f"sm_{arch} {_TRITON_DTYPE[dtype]} forward {name}: FAILED {type(exc).__name__}: {exc}")
    # Backward.
    ptrs = {n: "*fp32" for n in _grad_tile_kernel.arg_names if n.endswith("_ptr")}
    ptrs.update(img_ptr=tdt, txt_ptr=tdt, ws_ptr=tdt, d_scale_ptr="*fp64")
    for name, ce in backward_variants(dtype):
        ce = dict(ce, stride_id=1, stride_td=1, stride_wc=1)
        t0 = time.time()
        try:
            k = _compile(_grad_tile_kernel, ptrs,
                         ints={"row0", "col0", "R", "C", "D", "stride_im", "stride_tk", "stride_wr"},
                         floats={"coef_row", "coef_col", "coef_diag", "gscale"}, constexprs=ce,
                         div16={"row0", "col0", "R", "C", "D", "stride_im", "stride_tk", "stride_wr"},
                         cfg=bwd_cfg, arch=arch)
            smem = k.metadata.shared
            over = " OVER LIMIT" if smem > _SMEM_LIMIT.get(arch, 1 << 30) else ""
            print(f"sm_{arch} {_TRITON_DTYPE[dtype]:4s} backward {bwd_cfg} {name:26s} "
                  f"{_ptxas_report(k.asm['ptx'], arch)} smem={smem}{over} ({time.time() - t0:.1f}s)",
                  flush=True)
            failures += bool(over)
        except Exception as exc:
            failures += 1
            print(f"sm_{arch} {_TRITON_DTYPE[dtype]} backward {name}: FAILED {type(exc).__name__}: {exc}")
    return failures


def main(argv=None) -> int:
    if _config.interpreter_active():
        print("aot_check compiles for a GPU target: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"])
    ap.add_argument("--configs", default=None,
                    help="forward configs to try instead of the table: 'BM,BN,BK,warps,stages;...'")
    args = ap.parse_args(argv)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    failures = 0
    for arch in args.arch:
        for dname in args.dtype:
            dtype = dtypes[dname]
            cfg = _config.table_configs(arch // 10, dtype)
            fwds = [cfg.forward]
            if args.configs:
                fwds = [_config.KernelConfig(*map(int, c.split(","))) for c in args.configs.split(";")]
            for f in fwds:
                failures += check(arch, dtype, f, cfg.backward)
    print(f"aot_check: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
