"""The kernel variants step of benchmarks/gpu_check.sh: every variant, a small tile sweep, a winner.

    python benchmarks/bench_variants.py --budget-s 120 --out-dir $OUT      # on the GPU
    python benchmarks/bench_variants.py --dry-run --budget-s 60 --out-dir /tmp/x   # CPU rehearsal

Runs (``plan``): every variant of ``kernels/config.py`` VARIANTS at its own tile, then a small
sweep of tiles (``SWEEP_TILES``: the layouts the cost report reads as one or two CTAs per SM)
under the default variant.  Each run is one forward+backward of the symmetric CLIP loss,
bf16, N = 65,536, D = 512 on the GPU (N = 64, D = 40 on the CPU), and:
1. is checked against the torch backend on the same inputs (loss and both gradients,
   ||run - torch|| / ||torch|| <= ``TOLERANCE[dtype]``; a run that fails is never the winner);
2. is timed: median of triton.testing.do_bench on a GPU, of 3 timed calls on a CPU;
3. gets its fraction of the GEMM rate: 8 N^2 D / time over the N x D x N bf16 GEMM rate
   measured in the same run (``gemm_rate``).
Output in --out-dir: ``variants.csv`` (variant x tile x time x GEMM-rate fraction, with the
versions), ``variants.md`` (the same table), ``winner_sm90.json`` (the fastest run that passed:
the file ``kernels/config.py`` reads; copy it to kernels/winner_sm90.json to commit it).

Budget: before anything runs, ``plan`` prices each run (compile + check + timing, ``estimate_s``)
and keeps, in order, the runs that fit in --budget-s; every variant comes before any sweep
tile.  During the runs, none starts after the deadline.  The dry run prices CPU runs with the
same arithmetic and its own constants.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# Tiles (BM, BN, BK, num_warps, num_stages) swept under the default variant on sm_90, most promising
# first: 64 x 128 x 64 w8 s2 is the tile at which the forward fits two CTAs per SM (128 registers;
# benchmarks/results/kernel_prediction_sm90_2026-12-04.md).
SWEEP_TILES = [(64, 128, 64, 8, 2), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 3)]
DRY_SWEEP_TILES = [(32, 32, 32, 1, 1), (64, 32, 32, 1, 1)]
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


@dataclasses.dataclass(frozen=True)
class Run:
    variant: str
    tile: Optional[Tuple[int, int, int, int, int]]   # None: the variant's own tile


@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds a run takes beyond its timed calls, and the call estimate's inputs."""
    compile_s: float      # Triton compiles of the forward, fallback and backward kernels
    check_s: float        # the comparison with the torch backend (its reference is paid once)
    calls: int            # calls per timing (warm-up + timed)
    call_s: float         # one forward+backward


def costs(dry_run: bool, n: int, d: int, gemm_tflops: float) -> Costs:
    """The price list.  GPU: a call at 0.5 of the measured GEMM rate (8 N^2 D flops), 3 Triton
    compiles of ~4 s each (aot_check's sm_90 compile times on a shared 2-core CPU are 3-12 s a
    kernel), do_bench's ~25 calls.  CPU: the
    interpreter's ~1 s a call at N = 64 on a contended 2-core machine."""
    if dry_run:
        return Costs(compile_s=0.0, check_s=1.0, calls=4, call_s=1.0)
    call = 8.0 * n * n * d / (0.5 * gemm_tflops * 1e12)
    return Costs(compile_s=12.0, check_s=2 * call, calls=25, call_s=call)


def estimate_s(c: Costs) -> float:
    return c.compile_s + c.check_s + c.calls * c.call_s


def plan(variants: List[str], tiles: List[tuple], budget_s: float, reserve_s: float,
         c: Costs) -> Tuple[List[Run], List[Tuple[Run, str]]]:
    """(runs kept, [(run dropped, why)]): variants first, then tiles, while the sum of
    ``estimate_s`` stays within budget_s - reserve_s (the reference and the GEMM rate)."""
    kept, dropped, total = [], [], 0.0
    for run in [Run(v, None) for v in variants] + [Run("default", tuple(t)) for t in tiles]:
        est = estimate_s(c)
        if total + est <= budget_s - reserve_s:
            kept.append(run)
            total += est
        else:
            dropped.append((run, f"estimated {est:.0f} s, {budget_s - reserve_s - total:.0f} s left in the plan"))
    return kept, dropped


def gemm_rate(n: int, d: int, device: torch.device) -> float:
    """TFLOP/s of an (n x d) @ (d x n) bf16 product on random data (the loss's GEMM shape)."""
    from bench_gpu import bench

    a = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    b = torch.randn(d, n, device=device, dtype=torch.bfloat16)
    ms, _, _ = bench(lambda: torch.mm(a, b), device)
    return 2.0 * n * n * d / (ms * 1e-3) / 1e12


def loss_and_grads(img, txt, scale, backend):
    import clip_fast

    loss = clip_fast.clip_loss(img, txt, scale, backend=backend)
    return [loss.detach().float()] + [g.float() for g in torch.autograd.grad(loss, (img, txt))]


def configs_for(run: Run, device: torch.device):
    """The Configs a run forces (None: the variant's own choice of tile)."""
    from clip_fast.kernels import config as kconfig

    if run.tile is None:
        return None
    t = kconfig.KernelConfig(*run.tile)
    return kconfig.Configs(forward=t, backward=t, col_splits=1 if device.type != "cuda" else None)


def time_run(run: Run, img, txt, scale, ref, device, dry_run: bool) -> Tuple[float, float]:
    """(median ms, max relative error against ``ref``) for one run."""
    import contextlib

    from bench_gpu import sync
    from clip_fast.kernels import config as kconfig

    cfg = configs_for(run, device)
    with kconfig.variant_override(run.variant), (kconfig.override(cfg) if cfg else contextlib.nullcontext()):
        got = loss_and_grads(img, txt, scale, "triton")
        err = max(((g - r).norm() / r.norm().clamp_min(1e-30)).item() for g, r in zip(got, ref))
        fn = lambda: loss_and_grads(img, txt, scale, "triton")  # noqa: E731
        if device.type == "cuda":
            import triton.testing
            ms = float(triton.testing.do_bench(fn, warmup=100, rep=400, return_mode="median"))
        else:
            times = []
            for _ in range(3):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times.append(1e3 * (time.perf_counter() - t0))
            ms = statistics.median(times)
    return ms, err


def write_outputs(out_dir, rows, env, n, d, rate, dry_run) -> Optional[dict]:
    """variants.csv, variants.md and winner_sm90.json (the fastest run within tolerance)."""
    os.makedirs(out_dir, exist_ok=True)
    fields = ["variant", "tile", "median_ms", "frac_gemm", "rel_err_vs_torch", "status", "note"]
    with open(os.path.join(out_dir, "variants.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields + sorted(env), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**env, **r})
    ok = [r for r in rows if r["status"] == "ok"]
    best = min(ok, key=lambda r: r["median_ms"]) if ok else None
    with open(os.path.join(out_dir, "variants.md"), "w") as f:
        f.write(f"# kernel variants, CLIP forward+backward, bf16, N={n}, D={d}\n\n"
                + ", ".join(f"{k} {v}" for k, v in sorted(env.items()))
                + f"\n\nGEMM rate ({n} x {d} x {n} bf16, this run): {rate:.1f} TFLOP/s"
                + (" -- DRY RUN on CPU (Triton interpreter, contended CPU): timings rehearse the "
                   "step, they say nothing about a GPU" if dry_run else "") + "\n\n"
                + "| " + " | ".join(fields) + " |\n|" + "---|" * len(fields) + "\n")
        for r in rows:
            f.write("| " + " | ".join(_cell(r.get(k)) for k in fields) + " |\n")
        f.write(f"\nwinner: {best['variant']} {best['tile']}\n" if best else "\nno run passed\n")
    if best is None:
        return None
    winner = {"variant": best["variant"], "tile": list(best["tile_used"]) if best["tile_used"] else None,
              "median_ms": best["median_ms"], "N": n, "D": d, "dtype": "bf16", "dry_run": dry_run, **env}
    with open(os.path.join(out_dir, "winner_sm90.json"), "w") as f:
        json.dump(winner, f, indent=1)
    return winner


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def run_all(runs, img, txt, scale, ref, device, dry_run, deadline, n, d, rate, c: Costs) -> List[dict]:
    """Time every planned run that is estimated to end by the deadline; one row each (skipped
    ones say why).  The estimate grows to the wall time of the slowest run so far."""
    from clip_fast.kernels import config as kconfig

    rows, est = [], estimate_s(c)
    for run in runs:
        row = {"variant": run.variant, "tile": "own" if run.tile is None else "x".join(map(str, run.tile)),
               "tile_used": run.tile or _own_tile(run.variant, device, kconfig)}
        if time.time() + est > deadline:
            rows.append({**row, "status": "skipped",
                         "note": f"estimated {est:.0f} s, {max(0.0, deadline - time.time()):.0f} s left"})
            continue
        t_run = time.time()
        try:
            ms, err = time_run(run, img, txt, scale, ref, device, dry_run)
            # The next run's estimate: the larger of the price list's and this run's wall time.
            est = max(estimate_s(c), time.time() - t_run)
        except Exception as exc:   # report and keep going
            rows.append({**row, "status": "error", "note": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        status = "ok" if err <= TOLERANCE[img.dtype] else "wrong"
        rows.append({**row, "median_ms": ms, "frac_gemm": 8.0 * n * n * d / (ms * 1e-3) / 1e12 / rate,
                     "rel_err_vs_torch": err, "status": status})
        print(f"[variants] {row['variant']:22s} {row['tile']:18s} {ms:10.3f} ms  err {err:.2e}  {status}",
              flush=True)
    return rows


def _own_tile(variant, device, kconfig):
    if device.type != "cuda":
        return None
    t = kconfig.VARIANT_TILES.get(variant) or kconfig.table_configs(9).forward
    return dataclasses.astuple(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--n", type=int, default=None, help="batch (default 65536; 64 with --dry-run)")
    ap.add_argument("--d", type=int, default=None, help="feature dimension (default 512; 40 with --dry-run)")
    args = ap.parse_args(argv)
    t0 = time.time()
    from bench_gpu import environment
    from bench_loss import make_case
    from clip_fast.kernels import config as kconfig

    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    n, d = (64, 40) if args.dry_run else (65536, 512)
    n, d = args.n or n, args.d or d
    env = environment(device)
    rate = gemm_rate(n, d, device)
    img, txt, scale = make_case(n, d, torch.bfloat16, device.type)
    ref = loss_and_grads(img, txt, scale, "torch")
    c = costs(args.dry_run, n, d, rate)
    tiles = DRY_SWEEP_TILES if args.dry_run else SWEEP_TILES
    runs, dropped = plan(list(kconfig.VARIANTS), tiles, args.budget_s, time.time() - t0, c)
    total = sum(estimate_s(c) for _ in runs) + (time.time() - t0)
    print(f"[variants] plan: {len(runs)} run(s), estimated {total:.0f} s of the {args.budget_s:.0f} s budget "
          f"(each: compile {c.compile_s:.0f} s + check {c.check_s:.1f} s + {c.calls} x {c.call_s * 1e3:.1f} ms); "
          f"GEMM {rate:.4g} TFLOP/s", flush=True)
    rows = run_all(runs, img, txt, scale, ref, device, args.dry_run, t0 + args.budget_s, n, d, rate, c)
    rows += [{"variant": r.variant, "tile": "x".join(map(str, r.tile)) if r.tile else "own",
              "status": "skipped", "note": why} for r, why in dropped]
    winner = write_outputs(args.out_dir, rows, env, n, d, rate, args.dry_run)
    print(f"[variants] winner: {winner['variant']} tile {winner['tile']} ({winner['median_ms']:.3f} ms)"
          if winner else "[variants] no run passed: no winner file", flush=True)
    print(f"[variants] done in {time.time() - t0:.0f} s", flush=True)
    return 0 if winner else 1


if __name__ == "__main__":
    sys.exit(main())
