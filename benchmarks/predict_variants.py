"""Predicted sm_90 time of each kernel variant from the static cost report (no GPU).

    python benchmarks/predict_variants.py benchmarks/results/kernel_cost_sm90_2026-12-04.txt \
        > benchmarks/results/kernel_prediction_sm90_2026-12-04.md

The model (``MODEL`` below holds its constants; every one is a lead until the GPU check
measures it): CLIP forward+backward, bf16, N = 65,536, D = 512, one H200.
* MMA time of a tile: its flops (2 BM BN D, more for the fused backward) at the measured
  N x 512 x N bf16 GEMM rate, shared evenly by the SMs.
* Epilogue time of a tile: the larger of its instruction issue (epilogue instructions per
  warp x warps / 4 schedulers a clock) and its MUFU time (exp2 per element x BM BN / 16 a clock).
* Overlap: none inside one CTA (Triton's tile loop issues the epilogue after the MMA loop on the
  same warps); a second resident CTA hides the shorter of the two (tile = max instead of sum).
  Resident CTAs per SM: the register file (64 K) over regs x 32 x warps, and shared memory
  (227 KiB) over the kernel's.
* Memory: the workspace backward writes G once (2 N^2 bytes) at the copy rate, not overlapped;
  its two cuBLAS GEMMs run at the GEMM rate (compute-bound, they read G inside it).
* Work spread: tiles / SMs, no tail effect (N^2 / (BM BN) >> SMs); so a persistent grid
  (``tma_persistent``) is predicted as its non-persistent twin, and spill traffic (``regs128``)
  costs nothing here: both are what the GPU run tests beyond the model.
"""
from __future__ import annotations

import re
import sys
from typing import Dict, List

MODEL = dict(
    N=65536, D=512, sms=132, clock_hz=1.98e9,
    gemm_tflops=586.0,        # N x 512 x N bf16 on an H200 (8 N^2 D in 30 ms, docs/gpu_variants.md)
    copy_bytes_per_s=4.3e12,  # a lead below the 4.8 TB/s datasheet; the GPU check measures none yet
    issue_per_clock=4.0, mufu_per_clock=16.0, regs_per_sm=65536, smem_per_sm=227 * 1024,
)
FIELDS = ["kernel", "tile", "mma", "MMA/tile", "ex2/el", "shfl", "bar", "epi", "instr",
          "regs", "spill", "smem"]


def parse_report(text: str) -> Dict[str, Dict[str, str]]:
    """{kernel name: {field: value}} from the table of an aot_check --sass report."""
    rows = {}
    for line in text.splitlines():
        if not line.startswith(("triton ", "cuda ")):
            continue
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= len(FIELDS):
            rows[cells[0].rstrip(" *")] = dict(zip(FIELDS, cells))
    return rows


def _first(v: str) -> float:
    """The common-path figure of 'a' or 'a/b' (with '>=' lower bounds read as given)."""
    return float(v.lstrip(">=").split("/")[0])


def tile_shape(row) -> tuple:
    m = re.match(r"(\d+)x(\d+)x(\d+) w(\d+)", row["tile"])
    return tuple(int(x) for x in m.groups())


def sweep_ms(row, flops_per_tile: float, tiles: float, m=MODEL) -> dict:
    """One sweep of ``tiles`` tiles of this kernel: MMA, epilogue, CTAs per SM, time (ms)."""
    bm, bn, _bk, warps = tile_shape(row)
    mma_s = flops_per_tile / (m["gemm_tflops"] * 1e12 / m["sms"])
    issue = _first(row["epi"]) * warps / m["issue_per_clock"]
    mufu = _first(row["ex2/el"]) * bm * bn / m["mufu_per_clock"]
    epi_s = max(issue, mufu) / m["clock_hz"]
    regs, smem = int(row["regs"].split(",")[0]), int(row["smem"])
    ctas = max(1, min(m["regs_per_sm"] // (regs * 32 * warps), m["smem_per_sm"] // max(smem, 1)))
    per_tile = max(mma_s, epi_s) if ctas >= 2 else mma_s + epi_s
    return dict(mma_ms=1e3 * mma_s * tiles / m["sms"], epi_ms=1e3 * epi_s * tiles / m["sms"],
                ctas=ctas, ms=1e3 * per_tile * tiles / m["sms"], spill=row["spill"])


# The variants whose backward is the G workspace + cuBLAS (the others: kernels/fused_backward.py).
WORKSPACE_BACKWARD = ("default", "share_exp", "tma", "tma_persistent", "regs128")


def predict(rows: Dict[str, Dict[str, str]], m=MODEL) -> List[dict]:
    """One prediction per variant (bf16): forward sweep + backward, with the terms shown."""
    N, D = m["N"], m["D"]
    gemm_ms = 1e3 * 2.0 * N * N * D / (m["gemm_tflops"] * 1e12)
    g_store_ms = 1e3 * 2.0 * N * N / m["copy_bytes_per_s"]
    out = []
    for variant, fwd, bwd in (("default", "sweep", "tile"), ("share_exp", "sweep shared-exp", "tile shared-exp"),
                              ("fused_bwd", "sweep fused_bwd tile", None),
                              ("share_exp+fused_bwd", "sweep shared-exp fused_bwd tile", "shared-exp"),
                              ("tma", "sweep tma", "tile"), ("tma_persistent", "sweep tma persistent", "tile tma persistent"),
                              ("regs128", "sweep regs128", "tile regs128")):
        f = rows.get(f"triton bf16 forward {fwd}")
        if f is None:
            continue
        bm, bn, _, _ = tile_shape(f)
        tiles = N * N / (bm * bn)
        fw = sweep_ms(f, 2.0 * bm * bn * D, tiles, m)
        if variant in WORKSPACE_BACKWARD:
            b = sweep_ms(rows[f"triton bf16 backward {bwd}"], 2.0 * bm * bn * D, tiles, m)
            bw_ms = b["ms"] + g_store_ms + 2 * gemm_ms
            how = (f"tile kernel {b['ms']:.1f} (MMA {b['mma_ms']:.1f}, epilogue {b['epi_ms']:.1f}, "
                   f"{b['ctas']} CTA/SM) + G store {g_store_ms:.1f} + 2 cuBLAS GEMMs {2 * gemm_ms:.1f}")
        else:
            suffix = " shared-exp" if variant.startswith("share_exp") else ""
            dv = 256
            chunks = D // dv
            parts = []
            for kind in ("rows", "cols"):
                name = f"triton bf16 fused_bwd {kind} {'d_img' if kind == 'rows' else 'd_txt'}" if not suffix \
                    else f"triton bf16 fused_bwd {kind}{suffix}"
                # Per tile: the recompute (2 BM BN D) and the gradient MMA (2 BM BN DV), once per chunk.
                parts.append(sweep_ms(rows[name], 2.0 * bm * bn * (D + dv), tiles * chunks, m))
            bw_ms = sum(p["ms"] for p in parts)
            how = " + ".join(f"{k} launch {p['ms']:.1f} (MMA {p['mma_ms']:.1f}, epilogue {p['epi_ms']:.1f}, "
                             f"{p['ctas']} CTA/SM, spill {p['spill']} B)" for k, p in zip(("rows", "cols"), parts)) \
                + f"; D/DV = {chunks} recomputes per launch"
        total = fw["ms"] + bw_ms
        out.append(dict(variant=variant, forward_ms=fw["ms"], fwd_how=(
            f"MMA {fw['mma_ms']:.1f}, epilogue {fw['epi_ms']:.1f}, {fw['ctas']} CTA/SM"),
            backward_ms=bw_ms, bwd_how=how, total_ms=total,
            frac=8.0 * N * N * D / (total * 1e-3) / (m["gemm_tflops"] * 1e12)))
    return out


def predict_siglip(rows: Dict[str, Dict[str, str]], m=MODEL) -> List[dict]:
    """One prediction per SigLIP variant (kernels/config.py SIGLIP_VARIANTS; bf16, diagonal labels,
    loss and every gradient), by the same model: the one-sweep designs ("default", "tma",
    "tma_persistent", the last from its flattened tile loop's row, its grid's spread not modelled
    as for CLIP's) are the tile kernel + G's store + two cuBLAS GEMMs; "fused_bwd" is its two launches, each sweeping
    D / DV times with 2 BM BN (D + DV) flops a tile (the recompute and the gradient MMA)."""
    N, D = m["N"], m["D"]
    gemm_ms = 1e3 * 2.0 * N * N * D / (m["gemm_tflops"] * 1e12)
    g_store_ms = 1e3 * 2.0 * N * N / m["copy_bytes_per_s"]
    out = []
    for variant, names in (("default", ["tile diagonal"]), ("tma", ["tile diagonal tma"]),
                           ("tma_persistent", ["tile diagonal tma persistent"]),
                           ("fused_bwd", ["fused rows d_img", "fused cols d_txt"])):
        found = [rows.get(f"triton bf16 siglip {n}") for n in names]
        if None in found:
            continue
        bm, bn, _, _ = tile_shape(found[0])
        tiles = N * N / (bm * bn)
        if variant != "fused_bwd":
            k = sweep_ms(found[0], 2.0 * bm * bn * D, tiles, m)
            total = k["ms"] + g_store_ms + 2 * gemm_ms
            how = (f"tile kernel {k['ms']:.1f} (MMA {k['mma_ms']:.1f}, epilogue {k['epi_ms']:.1f}, "
                   f"{k['ctas']} CTA/SM, spill {k['spill']} B) + G store {g_store_ms:.1f} "
                   f"+ 2 cuBLAS GEMMs {2 * gemm_ms:.1f}")
        else:
            dv = 256
            parts = [sweep_ms(r, 2.0 * bm * bn * (D + dv), tiles * (D // dv), m) for r in found]
            total = sum(p["ms"] for p in parts)
            how = " + ".join(f"{k} launch {p['ms']:.1f} (MMA {p['mma_ms']:.1f}, epilogue {p['epi_ms']:.1f}, "
                             f"{p['ctas']} CTA/SM, spill {p['spill']} B)" for k, p in zip(("rows", "cols"), parts)) \
                + f"; D/DV = {D // dv} recomputes per launch"
        out.append(dict(variant=variant, total_ms=total, how=how,
                        frac=6.0 * N * N * D / (total * 1e-3) / (m["gemm_tflops"] * 1e12)))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        rows = parse_report(f.read())
    preds = predict(rows)
    m = MODEL
    print("# Predicted sm_90 times of the kernel variants -- UNMEASURED\n")
    print(f"From the static cost report `{argv[0].split('/')[-1]}` by `benchmarks/predict_variants.py` "
          "(its module doc states the model). No GPU ran any of this: these are predictions for "
          "benchmarks/gpu_check.sh's variants step to test.\n")
    print("CLIP forward+backward, bf16, N = {N:,}, D = {D}; constants: {sms} SMs at {ghz} GHz, bf16 GEMM "
          "rate {gemm_tflops} TFLOP/s (N x 512 x N), copy {cp} TB/s, 4 instructions and 16 MUFU.EX2 "
          "per SM per clock.\n".format(ghz=m["clock_hz"] / 1e9, cp=m["copy_bytes_per_s"] / 1e12, **m))
    print("| variant | forward ms | backward ms | total ms | GEMM-rate fraction (8 N^2 D) | forward terms | backward terms |")
    print("|---|---|---|---|---|---|---|")
    for p in preds:
        print(f"| {p['variant']} | {p['forward_ms']:.1f} | {p['backward_ms']:.1f} | {p['total_ms']:.1f} | "
              f"{p['frac']:.2f} | {p['fwd_how']} | {p['bwd_how']} |")
    print("\nSigLIP loss and gradients (one call: the sweep and both gradients), bf16, diagonal labels, "
          "same N, D and constants; GEMM-rate fraction over SigLIP's floor of 6 N^2 D flops.\n")
    print("| SigLIP variant | total ms | GEMM-rate fraction (6 N^2 D) | terms |")
    print("|---|---|---|---|")
    for p in predict_siglip(rows):
        print(f"| {p['variant']} | {p['total_ms']:.1f} | {p['frac']:.2f} | {p['how']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
