"""The kernel variants step of benchmarks/gpu_check.sh: every variant, a small tile sweep, a winner.

    python benchmarks/bench_variants.py --budget-s 120 --out-dir $OUT      # on the GPU
    python benchmarks/bench_variants.py --dry-run --budget-s 60 --out-dir /tmp/x   # CPU rehearsal

Runs (``plan``): every variant of ``kernels/config.py`` VARIANTS at its own tile, every SigLIP
variant (SIGLIP_VARIANTS), then a small sweep of tiles (``SWEEP_TILES``: the layouts the cost
report reads as one or two CTAs per SM) under the default variant.  Each run is one
forward+backward of the symmetric CLIP loss (or of the SigLIP loss, scale and bias -10, every
gradient), bf16, N = 65,536, D = 512 on the GPU (N = 64, D = 40 on the CPU), and:
1. is checked against the torch backend on the same inputs (loss and every gradient,
   ||run - torch|| / ||torch|| <= ``TOLERANCE[dtype]``; a run that fails is never the winner);
2. is timed: median of triton.testing.do_bench on a GPU, of 3 timed calls on a CPU;
3. gets its fraction of the GEMM rate: 8 N^2 D / time over the N x D x N bf16 GEMM rate
   measured in the same run (``gemm_rate``).
Then the largest N (``largest_n``): the CLIP winner once more at the largest N that the time
left in the step allows, priced from its own measured time at N = 65,536 as time ~ N^2 (the
torch check included, 3 timed calls), and that the GPU memory allows (the run's peak at 65,536
scaled by N, O(N D) buffers); checked against the torch backend, whose chunked sweep needs O(N D)
memory too, so the check always fits where the run does.
Output in --out-dir: ``variants.csv`` (loss x variant x tile x N x time x GEMM-rate fraction,
with the versions), ``variants.md`` (the same table), ``winner_sm90.json`` (the fastest CLIP run
that passed, with the fastest SigLIP variant under "siglip": the file ``kernels/config.py``
reads; copy it to kernels/winner_sm90.json to commit it).

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

START = time.time()   # the step's clock starts before torch's import, as gpu_check.sh's timeout does
import torch  # noqa: E402

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
    loss: str = "clip"                               # "clip" or "siglip"


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


def estimate_s(c: Costs, loss: str = "clip") -> float:
    """Seconds one run is priced at; a SigLIP run compiles at most 2 kernels against CLIP's 3."""
    compile_s = c.compile_s * (2.0 / 3.0 if loss == "siglip" else 1.0)
    return compile_s + c.check_s + c.calls * c.call_s


def plan(variants: List[str], tiles: List[tuple], budget_s: float, reserve_s: float,
         c: Costs, siglip_variants: List[str] = ()) -> Tuple[List[Run], List[Tuple[Run, str]]]:
    """(runs kept, [(run dropped, why)]): CLIP variants first, SigLIP variants, then tiles, while
    the sum of ``estimate_s`` stays within budget_s - reserve_s (the references, the GEMM rate and
    the largest-N run's share)."""
    kept, dropped, total = [], [], 0.0
    runs = ([Run(v, None) for v in variants] + [Run(v, None, "siglip") for v in siglip_variants]
            + [Run("default", tuple(t)) for t in tiles])
    for run in runs:
        est = estimate_s(c, run.loss)
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


def loss_and_grads(img, txt, scale, backend, loss_name: str = "clip"):
    """[loss, d_img, d_txt] (CLIP) or [loss, d_img, d_txt, d_scale, d_bias] (SigLIP, bias -10)."""
    import clip_fast

    if loss_name == "siglip":
        bias = torch.tensor(-10.0, device=img.device, requires_grad=True)
        loss = clip_fast.siglip_loss(img, txt, scale, bias, backend=backend)
        wrt = (img, txt, scale, bias)
    else:
        loss = clip_fast.clip_loss(img, txt, scale, backend=backend)
        wrt = (img, txt)
    return [loss.detach().float()] + [g.float() for g in torch.autograd.grad(loss, wrt)]


def rel_err(got, ref) -> float:
    return max(((g - r).norm() / r.norm().clamp_min(1e-30)).item() for g, r in zip(got, ref))


def configs_for(run: Run, device: torch.device):
    """The Configs a run forces (None: the variant's own choice of tile)."""
    from clip_fast.kernels import config as kconfig

    if run.tile is None:
        return None
    t = kconfig.KernelConfig(*run.tile)
    return kconfig.Configs(forward=t, backward=t, col_splits=1 if device.type != "cuda" else None)


def _selected(run: Run, device):
    """The context that puts ``run``'s variant (and tile) in force."""
    import contextlib

    from clip_fast.kernels import config as kconfig

    if run.loss == "siglip":
        return kconfig.siglip_variant_override(run.variant)
    cfg = configs_for(run, device)
    stack = contextlib.ExitStack()
    stack.enter_context(kconfig.variant_override(run.variant))
    if cfg:
        stack.enter_context(kconfig.override(cfg))
    return stack


def timed_calls(fn, device, calls: int = 3) -> float:
    """Median ms of ``calls`` synchronised calls (no warm-up: the caller has run it once)."""
    from bench_gpu import sync

    times = []
    for _ in range(calls):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def time_run(run: Run, img, txt, scale, ref, device, dry_run: bool) -> Tuple[float, float]:
    """(median ms, max relative error against ``ref``) for one run."""
    with _selected(run, device):
        got = loss_and_grads(img, txt, scale, "triton", run.loss)
        err = rel_err(got, ref)
        fn = lambda: loss_and_grads(img, txt, scale, "triton", run.loss)  # noqa: E731
        if device.type == "cuda":
            import triton.testing
            ms = float(triton.testing.do_bench(fn, warmup=100, rep=400, return_mode="median"))
        else:
            ms = timed_calls(fn, device)
    return ms, err


FLOPS_PER_N2D = {"clip": 8.0, "siglip": 6.0}   # the fused floor of each loss, forward+backward


def _fastest(rows, loss: str, n: int) -> Optional[dict]:
    ok = [r for r in rows if r["status"] == "ok" and r.get("loss", "clip") == loss and r.get("n") == n]
    return min(ok, key=lambda r: r["median_ms"]) if ok else None


def write_outputs(out_dir, rows, env, n, d, rate, dry_run) -> Optional[dict]:
    """variants.csv, variants.md and winner_sm90.json (the fastest CLIP run within tolerance at N =
    ``n``, with the fastest SigLIP variant under "siglip")."""
    os.makedirs(out_dir, exist_ok=True)
    fields = ["loss", "variant", "tile", "n", "median_ms", "frac_gemm", "rel_err_vs_torch", "status", "note"]
    with open(os.path.join(out_dir, "variants.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields + sorted(env), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**env, **r})
    best, best_sig = _fastest(rows, "clip", n), _fastest(rows, "siglip", n)
    with open(os.path.join(out_dir, "variants.md"), "w") as f:
        f.write(f"# kernel variants, CLIP and SigLIP forward+backward, bf16, N={n} (and the largest N), D={d}\n\n"
                + ", ".join(f"{k} {v}" for k, v in sorted(env.items()))
                + f"\n\nGEMM rate ({n} x {d} x {n} bf16, this run): {rate:.1f} TFLOP/s; frac_gemm = "
                  "(8 N^2 D for CLIP, 6 N^2 D for SigLIP) / time / that rate"
                + (" -- DRY RUN on CPU (Triton interpreter, contended CPU): timings rehearse the "
                   "step, they say nothing about a GPU" if dry_run else "") + "\n\n"
                + "| " + " | ".join(fields) + " |\n|" + "---|" * len(fields) + "\n")
        for r in rows:
            f.write("| " + " | ".join(_cell(r.get(k)) for k in fields) + " |\n")
        f.write(f"\nwinner: {best['variant']} {best['tile']}\n" if best else "\nno CLIP run passed\n")
        f.write(f"SigLIP winner: {best_sig['variant']}\n" if best_sig else "no SigLIP run passed\n")
    if best is None:
        return None
    winner = {"variant": best["variant"], "tile": list(best["tile_used"]) if best["tile_used"] else None,
              "median_ms": best["median_ms"], "N": n, "D": d, "dtype": "bf16", "dry_run": dry_run, **env}
    if best_sig is not None:
        winner["siglip"] = {"variant": best_sig["variant"], "median_ms": best_sig["median_ms"]}
    with open(os.path.join(out_dir, "winner_sm90.json"), "w") as f:
        json.dump(winner, f, indent=1)
    return winner


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def run_all(runs, inputs, refs, device, dry_run, deadline, n, d, rate, c: Costs) -> List[dict]:
    """Time every planned run that is estimated to end by the deadline; one row each (skipped
    ones say why).  A run's estimate is the larger of its price and the last run's wall time.  ``refs``:
    the torch backend's answer per loss."""
    from clip_fast.kernels import config as kconfig

    rows, last_wall = [], 0.0
    for run in runs:
        est = max(estimate_s(c, run.loss), last_wall)
        row = {"loss": run.loss, "variant": run.variant, "n": n,
               "tile": "own" if run.tile is None else "x".join(map(str, run.tile)),
               "tile_used": run.tile or (_own_tile(run.variant, device, kconfig) if run.loss == "clip" else None)}
        if time.time() + est > deadline:
            rows.append({**row, "status": "skipped",
                         "note": f"estimated {est:.0f} s, {max(0.0, deadline - time.time()):.0f} s left"})
            continue
        t_run = time.time()
        try:
            ms, err = time_run(run, *inputs, refs[run.loss], device, dry_run)
            # The next run's estimate: the larger of the price list's and this run's wall time.
            last_wall = time.time() - t_run
        except Exception as exc:   # report and keep going
            rows.append({**row, "status": "error", "note": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        rows.append(_timed_row(row, ms, err, n, d, rate, inputs[0].dtype))
    return rows


def _timed_row(row, ms, err, n, d, rate, dtype) -> dict:
    status = "ok" if err <= TOLERANCE[dtype] else "wrong"
    print(f"[variants] {row['loss']:6s} {row['variant']:22s} {row['tile']:18s} N={n:<8d} {ms:10.3f} ms  "
          f"err {err:.2e}  {status}", flush=True)
    return {**row, "median_ms": ms, "rel_err_vs_torch": err, "status": status,
            "frac_gemm": FLOPS_PER_N2D[row["loss"]] * n * n * d / (ms * 1e-3) / 1e12 / rate}


def largest_n(ms_at_n: float, ref_s_at_n: float, n: int, left_s: float, mem_n: Optional[float],
              mem_total: Optional[float], multiple: int, max_n: int) -> Tuple[int, str]:
    """(N, how) for the largest-N run: the largest multiple of ``multiple`` (at most ``max_n``)
    whose priced time fits ``left_s`` -- the torch check plus 4 calls (one checked, 3 timed), all
    scaled from their measured times at ``n`` by (N / n)^2 -- and whose memory (the peak
    ``mem_n`` at ``n`` scaled by N / n) stays within 0.8 of ``mem_total``.  N <= n: no run."""
    per_n2 = (ref_s_at_n + 4 * ms_at_n * 1e-3) / n ** 2
    by_time = int((max(left_s, 0.0) / per_n2) ** 0.5) if per_n2 > 0 else max_n
    by_mem = int(n * 0.8 * mem_total / mem_n) if mem_n and mem_total else max_n
    big = min(by_time, by_mem, max_n) // multiple * multiple
    how = (f"time: {left_s:.0f} s left at {per_n2 * n ** 2:.2f} s x (N/{n})^2 -> N <= {by_time}; "
           + (f"memory: peak {mem_n / 2**30:.2f} GiB at {n} x N/{n} <= 0.8 x {mem_total / 2**30:.0f} GiB "
              f"-> N <= {by_mem}" if mem_n and mem_total else "memory: not bounded here (CPU)")
           + f"; cap {max_n}")
    return big, how


def run_largest_n(winner_row, ref_s, n, d, rate, device, dry_run, deadline, max_n, mem_n) -> dict:
    """The CLIP winner at ``largest_n``'s N (priced into 0.8 of the time left), checked against the
    torch backend: one row."""
    from bench_loss import make_case

    mem_total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    # 0.8 of the time left: the N^2 scaling is an estimate, and the step's limit is a hard stop.
    big, how = largest_n(winner_row["median_ms"], ref_s, n, 0.8 * (deadline - time.time()), mem_n, mem_total,
                         4096 if device.type == "cuda" else 32, max_n)
    row = {"loss": "clip", "variant": winner_row["variant"], "tile": winner_row["tile"], "n": big,
           "note": how}
    print(f"[variants] largest N: {big} ({how})", flush=True)
    if big <= n:
        return {**row, "n": None, "status": "skipped"}
    tile = winner_row["tile_used"] if winner_row["tile"] != "own" else None
    run = Run(winner_row["variant"], tuple(tile) if tile else None)
    img, txt, scale = make_case(big, d, torch.bfloat16, device.type)
    try:
        ref = loss_and_grads(img, txt, scale, "torch")
        with _selected(run, device):
            err = rel_err(loss_and_grads(img, txt, scale, "triton"), ref)
            ms = timed_calls(lambda: loss_and_grads(img, txt, scale, "triton"), device)
    except Exception as exc:   # report it in the table
        return {**row, "status": "error", "note": f"{type(exc).__name__}: {exc}"[:200] + "; " + how}
    return {**_timed_row(row, ms, err, big, d, rate, img.dtype), "note": how}


def _own_tile(variant, device, kconfig):
    if device.type != "cuda":
        return None
    t = kconfig.VARIANT_TILES.get(variant) or kconfig.table_configs(9).forward
    return dataclasses.astuple(t)


def main(argv=None, t_start: Optional[float] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--n", type=int, default=None, help="batch (default 65536; 64 with --dry-run)")
    ap.add_argument("--d", type=int, default=None, help="feature dimension (default 512; 40 with --dry-run)")
    ap.add_argument("--large-n-s", type=float, default=25.0,
                    help="seconds of the budget kept for the largest-N run (0: no such run)")
    ap.add_argument("--max-n", type=int, default=None, help="cap of the largest N (default 1048576; 256 dry)")
    args = ap.parse_args(argv)
    t0 = t_start or time.time()
    from bench_gpu import environment
    from bench_loss import make_case
    from clip_fast.kernels import config as kconfig

    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    n, d = (64, 40) if args.dry_run else (65536, 512)
    n, d = args.n or n, args.d or d
    env = environment(device)
    rate = gemm_rate(n, d, device)
    img, txt, scale = make_case(n, d, torch.bfloat16, device.type)
    t_ref = time.time()
    refs = {"clip": loss_and_grads(img, txt, scale, "torch")}
    ref_s = time.time() - t_ref
    refs["siglip"] = loss_and_grads(img, txt, scale, "torch", "siglip")
    c = costs(args.dry_run, n, d, rate)
    tiles = DRY_SWEEP_TILES if args.dry_run else SWEEP_TILES
    reserve = time.time() - t0 + args.large_n_s
    runs, dropped = plan(list(kconfig.VARIANTS), tiles, args.budget_s, reserve, c, list(kconfig.SIGLIP_VARIANTS))
    total = sum(estimate_s(c, r.loss) for r in runs) + reserve
    print(f"[variants] plan: {len(runs)} run(s), estimated {total:.0f} s of the {args.budget_s:.0f} s budget "
          f"(each: compile {c.compile_s:.0f} s + check {c.check_s:.1f} s + {c.calls} x {c.call_s * 1e3:.1f} ms; "
          f"{args.large_n_s:.0f} s kept for the largest N); GEMM {rate:.4g} TFLOP/s", flush=True)
    deadline = t0 + args.budget_s
    rows = run_all(runs, (img, txt, scale), refs, device, args.dry_run, deadline - args.large_n_s, n, d, rate, c)
    rows += [{"loss": r.loss, "variant": r.variant, "tile": "x".join(map(str, r.tile)) if r.tile else "own",
              "n": n, "status": "skipped", "note": why} for r, why in dropped]
    best = _fastest(rows, "clip", n)
    write_outputs(args.out_dir, rows, env, n, d, rate, args.dry_run)   # kept if the step is stopped
    if best is not None and args.large_n_s > 0:
        mem_n = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        del img, txt, scale, refs
        rows.append(run_largest_n(best, ref_s, n, d, rate, device, args.dry_run, deadline,
                                  args.max_n or (256 if args.dry_run else 1 << 20), mem_n))
    winner = write_outputs(args.out_dir, rows, env, n, d, rate, args.dry_run)
    print(f"[variants] winner: {winner['variant']} tile {winner['tile']} ({winner['median_ms']:.3f} ms)"
          + (f"; SigLIP {winner['siglip']['variant']}" if "siglip" in winner else "; no SigLIP run passed")
          if winner else "[variants] no run passed: no winner file", flush=True)
    print(f"[variants] done in {time.time() - t0:.0f} s", flush=True)
    return 0 if winner else 1


if __name__ == "__main__":
    sys.exit(main(t_start=START))
