"""Compile every Triton kernel variant of every loss for sm_80 / sm_90 without a GPU and
report ptxas usage.

    python -m clip_fast.kernels.aot_check [--arch 90 80] [--configs "128,128,64,8,3;..."]
    python -m clip_fast.kernels.aot_check --sass [--d 512] [--only forward:sweep] [--no-cuda]

The variants are declared beside the kernels: each module of ``KERNEL_MODULES`` (the CLIP
forward and backward, SigLIP, distillation, the nested Matryoshka sweeps) has ``aot_variants(dtype, arch)`` yielding
``config.AotVariant`` (kind, name, tile, argument types).  ``--only`` keeps the variants
whose ``kind:name`` contains one of its words (kinds: forward, backward, fused_bwd, siglip, distill).

Runs Triton's full compiler (TTIR -> TTGIR -> LLVM -> PTX) for an explicit target and
then the ptxas bundled with Triton on the PTX, so kernel code that only fails in
compiled mode (types across branches, layouts, shared memory) is caught on a CPU-only
machine.  Integer arguments get the specialisations Triton gives them at run time for
contiguous inputs (unit feature stride as a constant, 16-divisible sizes/strides), so
the software pipelining and the register/spill figures are those of a real launch.
It measures nothing about speed.  Exit status 1 if any variant fails to compile or needs
more shared memory than the arch has; spills are reported, not failed (the tests hold the
variants that must not spill to it).

``--sass`` adds the kernel cost report (sm_90 only): every Triton variant's cubin, and
the CUDA kernels of csrc/ compiled with nvcc (``-cubin -arch=sm_90 -O3 -lineinfo``, the
extension's flags), are disassembled with nvdisasm and read statically
(``clip_fast.kernels.sass``, whose doc says how "per tile" and "per element" are derived
and what a static count cannot tell).  One row per kernel:
* mma: HGMMA (wgmma, Hopper's warpgroup MMA) or HMMA (mma.sync, the Ampere path), and
  the instruction shape; MMA/tile: matrix instructions per tile (HGMMA counted once per
  warpgroup, HMMA once per warp) at the report's D;
* ex2/el: MUFU.EX2 per element of the tile, common path (fewest exponentials) and the
  heaviest path where it differs;
* shfl, bar: SHFL and BAR instructions per warp per tile; epi: instructions per warp per
  tile after the MMA loop; instr: all instructions per warp per tile;
* regs, spill (spill stores, bytes), smem (bytes), from ptxas -v.
A kernel marked ``*`` has a note above the table; ``>=`` marks counts of a kernel with
loops besides the MMA loop inside its tile (the CUDA kernels' epilogue loops, whose trip
counts SASS does not state): those loops are counted once, so the figure is a lower bound.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import config as _config
from . import distill, fused_backward, grad_backward, lse_forward, nested, sass as _sass, siglip

# Every module with Triton kernels; each declares its variants as ``aot_variants(dtype, arch)``.
KERNEL_MODULES = (lse_forward, grad_backward, fused_backward, siglip, distill, nested)
_TRITON_DTYPE = _config._TRITON_DTYPE
_SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


_TRITON_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _tool(name: str) -> Optional[str]:
    """A CUDA binary tool: Triton's bundled copy first (matches its ptxas), then PATH."""
    bundled = os.path.join(_TRITON_BIN, name)
    return bundled if os.path.exists(bundled) else shutil.which(name)


def _tool_version(name: str) -> str:
    """'V13.1.80'-style version of a CUDA tool (the report names versions, not paths)."""
    path = _tool(name)
    if path is None:
        return "not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({type(exc).__name__})"
    found = re.findall(r"\bV\d+\.\d+\.\d+", out)
    return found[-1] if found else "unknown"


def _ptxas_usage(ptx: str, arch: int) -> Optional[Dict[str, str]]:
    """{'regs', 'spill'} from ptxas -v on ``ptx``, or None without ptxas."""
    ptxas = os.path.join(_TRITON_BIN, "ptxas")
    if not os.path.exists(ptxas):
        return None
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
    return {"regs": ",".join(regs) or "?", "spill": ",".join(spills) or "?"}


def _disassemble(cubin: bytes) -> str:
    """nvdisasm's text for a cubin (raises RuntimeError without nvdisasm)."""
    nvdisasm = _tool("nvdisasm")
    if nvdisasm is None:
        raise RuntimeError("nvdisasm not found (neither in Triton's package nor on PATH)")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {out.stderr.strip()[:200]}")
    return out.stdout


# Rows of the cost report, printed as one table at the end.
COST_ROWS: List[Dict[str, str]] = []
COST_FIELDS = ["kernel", "tile", "mma", "MMA/tile", "ex2/el", "shfl", "bar", "epi", "instr",
               "regs", "spill", "smem"]


def _fmt(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.3g}"


def _both(a: float, b: float, digits: str = "") -> str:
    """'a' or 'a/b' (common path / heaviest path) when they differ."""
    fa = format(a, digits) if digits else _fmt(a)
    fb = format(b, digits) if digits else _fmt(b)
    return fa if fa == fb else f"{fa}/{fb}"


def cost_row(name: str, sass_text: str, *, D: int, BM: int, BN: int, BK: int, warps: int,
             regs: str, spill: str, smem: str, function: Optional[str] = None) -> Dict[str, str]:
    """One row of the cost report for the (only, or named) function of ``sass_text``."""
    funcs = _sass.parse_functions(sass_text)
    items = funcs[function] if function else next(iter(funcs.values()))
    row = {"kernel": name, "tile": f"{BM}x{BN}x{BK} w{warps}", "regs": regs, "spill": spill, "smem": smem}
    try:
        c = _sass.tile_costs(items, D=D, BK=BK, BM=BM, BN=BN, warps=warps)
    except ValueError as exc:
        row.update(mma=f"no tile ({exc})")
        return row
    per_tile = (warps / 4 if c.kind == "HGMMA" else warps) if c.kind != "FFMA" else warps
    elems = BM * BN
    row.update({
        "mma": f"{c.kind}.{c.shape.split('.')[0]}" if c.kind != "FFMA" else "FFMA (no tensor cores)",
        # FFMA kernels (no tensor cores) nest unrolled loops the trip count rule cannot see.
        "MMA/tile": _fmt(c.light.mma * per_tile) if c.kind != "FFMA" else "-",
        "ex2/el": _both(c.light.ex2 * 32 * warps / elems, c.heavy.ex2 * 32 * warps / elems, ".3g"),
        "shfl": _both(c.light.shfl, c.heavy.shfl), "bar": _both(c.light.bar, c.heavy.bar),
        "epi": _both(c.light.epilogue, c.heavy.epilogue), "instr": _both(c.light.total, c.heavy.total),
    })
    if c.other_loops:
        # Loops besides the MMA loop count once per tile: these columns are lower bounds.
        for f in ("ex2/el", "shfl", "bar", "epi", "instr"):
            row[f] = ">=" + row[f]
    if c.notes or c.slices_per_iter != 1:
        row["kernel"] += " *"
        print(f"  note {name}: {c.structure}; {c.paths} path(s); "
              f"{_fmt(c.slices_per_iter)} BK slice(s) per MMA-loop iteration; " + "; ".join(c.notes))
    return row


def _compile(fn, ptr_types, ints, floats, constexprs, div16, cfg, arch, options=()):
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
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **dict(options)})


def compile_variant(v: _config.AotVariant, arch: int, tile: Optional[_config.KernelConfig] = None):
    """Compile one declared variant for ``sm_<arch>`` (at ``tile``, default the variant's own)."""
    ptrs = {n: "*fp32" for n in v.kernel.arg_names if n.endswith("_ptr")}
    ptrs.update(dict(v.pointers))
    return _compile(v.kernel, ptrs, ints=v.ints, floats=v.floats, constexprs=v.constexprs,
                    div16=v.div16, cfg=tile or v.tile, arch=arch, options=v.options)


def _sass_row(k, kind: str, name: str, dtype, cfg, D: int, arch: int) -> None:
    usage = _ptxas_usage(k.asm["ptx"], arch) or {"regs": "?", "spill": "?"}
    try:
        COST_ROWS.append(cost_row(f"triton {_TRITON_DTYPE[dtype]} {kind} {name}", _disassemble(k.asm["cubin"]),
                                  D=D, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, warps=cfg.num_warps,
                                  regs=usage["regs"], spill=usage["spill"], smem=str(k.metadata.shared)))
    except Exception as exc:   # report and keep going
        COST_ROWS.append({"kernel": f"triton {_TRITON_DTYPE[dtype]} {kind} {name}",
                          "mma": f"SASS not read: {type(exc).__name__}: {exc}"[:120]})


def _wanted(only: Optional[List[str]], kind: str, name: str) -> bool:
    return not only or any(o in f"{kind}:{name}" for o in only)


def check(arch: int, dtype: torch.dtype, forward_tile=None, sass_d: Optional[int] = None,
          only: Optional[List[str]] = None) -> int:
    """Compile every declared variant of every kernel; with ``sass_d`` (sm_90) add its row to
    the cost report.  ``forward_tile`` replaces the CLIP forward's tile (``--configs``)."""
    failures = 0
    for module in KERNEL_MODULES:
        for v in module.aot_variants(dtype, arch):
            if _wanted(only, v.kind, v.name):
                failures += _check_variant(v, arch, dtype, forward_tile if v.kind == "forward" else None,
                                           sass_d)
    return failures


def _check_variant(v: _config.AotVariant, arch: int, dtype: torch.dtype, tile, sass_d) -> int:
    """Compile, print one line, and return 1 on a failure (compile error, shared memory over
    the arch's limit)."""
    cfg = tile or v.tile
    t0 = time.time()
    try:
        k = compile_variant(v, arch, cfg)
    except Exception as exc:  # report and keep going
        print(f"sm_{arch} {_TRITON_DTYPE[dtype]} {v.kind} {v.name}: FAILED {type(exc).__name__}: {exc}")
        return 1
    usage = _ptxas_usage(k.asm["ptx"], arch)
    smem = k.metadata.shared
    over = " OVER LIMIT" if smem > _SMEM_LIMIT.get(arch, 1 << 30) else ""
    report = "ptxas not found" if usage is None else f"regs={usage['regs']} spill_stores={usage['spill']}B"
    print(f"sm_{arch} {_TRITON_DTYPE[dtype]:4s} {v.kind:8s} {cfg} {v.name:26s} "
          f"{report} smem={smem}{over} ({time.time() - t0:.1f}s)", flush=True)
    if sass_d is not None and arch == 90:
        _sass_row(k, v.kind, v.name, dtype, cfg, sass_d, arch)
    return int(bool(over))


# realpath: a checkout may reach kernels/ through the clip_fast/kernels symlink.
_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "csrc")
_MMA_ENUM = {"0": "wmma16", "1": "wmma-tf32", "2": "simt"}
_DTYPE_MANGLED = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}


_TILE_KERNELS = ("lse_forward_kernel", "lse_col_finish_kernel", "grad_strip_kernel")


def _cuda_name(mangled: str) -> str:
    """'lse_forward_kernel<bf16, wmma16>' from the mangled name of a csrc/ kernel."""
    i = 3 if mangled.startswith("_ZN") else 0
    while i < len(mangled):                  # <length><name> parts of the nested name
        m = re.match(r"(\d+)", mangled[i:])
        if not m:
            break
        i += len(m.group(1))
        name, i = mangled[i:i + int(m.group(1))], i + int(m.group(1))
        if name.endswith("_kernel"):
            t = re.match(r"I(13__nv_bfloat16|6__half|f)(?:LNS_3MmaE(\d)E)?", mangled[i:])
            if not t:
                return name
            args = [_DTYPE_MANGLED[t.group(1)]] + ([_MMA_ENUM.get(t.group(2), t.group(2))] if t.group(2) else [])
            return f"{name}<{', '.join(args)}>"
    return mangled[:60]


def _nvcc_usage(stderr: str) -> Dict[str, tuple]:
    """{function: (registers, spill store bytes, smem bytes)} from nvcc -Xptxas -v."""
    usage, fn, spill = {}, None, "0"
    for line in stderr.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?(\w+)'?", line)
        if m:
            fn = m.group(1)
        m = re.search(r"(\d+) bytes spill stores", line)
        if m:
            spill = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and fn:
            smem = re.search(r"(\d+) bytes smem", line)
            usage[fn] = (m.group(1), spill, smem.group(1) if smem else "0")
            spill = "0"
    return usage


def cuda_cost_rows(D: int, csrc: str = _CSRC) -> int:
    """Cost rows of the CUDA kernels in csrc/*.cu for sm_90; returns the failures."""
    nvcc = shutil.which("nvcc")
    if nvcc is None or not os.path.isdir(csrc):
        COST_ROWS.append({"kernel": "cuda kernels", "mma": "skipped: " + (
            "nvcc not on PATH" if nvcc is None else f"no {csrc} (an installed package has no sources)")})
        return 0
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted(glob.glob(os.path.join(csrc, "*.cu"))):
            cubin = os.path.join(tmp, os.path.basename(src) + ".cubin")
            out = subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", "-lineinfo", "-std=c++17",
                                  "-Xptxas", "-v", "-I", csrc, src, "-o", cubin],
                                 capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                failures += 1
                print(f"nvcc {os.path.basename(src)}: FAILED {out.stderr.strip()[-300:]}")
                continue
            usage = _nvcc_usage(out.stderr)
            with open(cubin, "rb") as f:
                text = _disassemble(f.read())
            for fn in _sass.parse_functions(text):
                regs, spill, smem = usage.get(fn, ("?", "?", "?"))
                if not _cuda_name(fn).startswith(_TILE_KERNELS):
                    continue   # row norms, the column finish pass: no tile of S
                # csrc/tile.cuh: 64 x 64 tiles, 128 threads (4 warps), D staged 32 wide.
                COST_ROWS.append(cost_row(f"cuda {_cuda_name(fn)}", text, D=D, BM=64, BN=64, BK=32,
                                          warps=4, regs=regs, spill=spill, smem=smem, function=fn))
    return failures


def print_cost_table(D: int) -> None:
    widths = {f: max([len(f)] + [len(r.get(f, "")) for r in COST_ROWS]) for f in COST_FIELDS}
    print(f"\nkernel cost report, sm_90, D={D} (static SASS counts; clip_fast.kernels.sass says how; "
          "a/b = common path / heaviest path)")
    print("  ".join(f.ljust(widths[f]) for f in COST_FIELDS).rstrip())
    for r in COST_ROWS:
        print("  ".join(r.get(f, "").ljust(widths[f]) for f in COST_FIELDS).rstrip())


def main(argv=None) -> int:
    if _config.interpreter_active():
        print("aot_check compiles for a GPU target: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=None, help="default: 90 80 (90 with --sass)")
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"])
    ap.add_argument("--configs", default=None,
                    help="CLIP forward configs to try instead of the table: 'BM,BN,BK,warps,stages;...'")
    ap.add_argument("--sass", action="store_true",
                    help="add the kernel cost report (sm_90 SASS: MMA kind, exp2, shuffles, barriers)")
    ap.add_argument("--d", type=int, default=512, help="feature dimension D for the per-tile counts")
    ap.add_argument("--only", nargs="+", default=None,
                    help="variants whose 'KIND:NAME' (e.g. 'forward:sweep', 'siglip:', 'distill:') "
                         "contains one of these")
    ap.add_argument("--no-cuda", action="store_true", help="--sass without the CUDA kernels")
    args = ap.parse_args(argv)
    if args.arch is None:
        args.arch = [90] if args.sass else [90, 80]
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    failures = 0
    if args.sass:
        print(f"triton {triton.__version__}, torch {torch.__version__}, nvdisasm {_tool_version('nvdisasm')}, "
              f"nvcc {_tool_version('nvcc')}")
    for arch in args.arch:
        for dname in args.dtype:
            dtype = dtypes[dname]
            if not args.configs:
                failures += check(arch, dtype, None, args.d if args.sass else None, args.only)
                continue
            for c in args.configs.split(";"):  # each forward tile, the other kernels at their own
                f = _config.KernelConfig(*map(int, c.split(",")))
                failures += check(arch, dtype, f, args.d if args.sass else None, args.only)
    if args.sass:
        if not args.no_cuda:
            failures += cuda_cost_rows(args.d)
        print_cost_table(args.d)
    print(f"aot_check: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
