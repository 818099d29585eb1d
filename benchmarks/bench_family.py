"""What each option of the CLIP loss family costs against the plain loss, in one run.

    python benchmarks/bench_family.py                  # CPU: N=16384, D=512, fp32, torch backend
    python benchmarks/bench_family.py --n 4096 --reps 3

Cases (forward+backward of ``FastClipLoss``; the options as ``clip_fast.clip_loss`` documents them):

    plain                  open_clip's ClipLoss
    group_ids              ``--classes`` random class ids as positive groups (10: Fashion-MNIST)
    label_smoothing        epsilon ``--eps`` (0.1: ALIGN)
    image_to_text_weight   lambda ``--lam`` (0.3)
    hard_negatives         ``--neg-frac`` * N hard-negative texts and as many images
    all                    all of the above together

The option terms are O(N * D) host work (``clip_fast.clip.targets``), so every case but the hard
negatives should cost about what plain costs.  Hard negatives add the sweeps of their two
rectangular blocks, N x M_t and M_i x N; ``work`` in the table is the logit entries swept
relative to plain, ``(N^2 + N M_t + M_i N) / N^2``, the ratio those blocks alone would give.

Time: the cases run interleaved in one process (warm-up first, then ``--reps`` rounds of one
step per case), so every case sees the same machine load; median and 20/80 % quantiles of
the wall time, and the median of the process's CPU time, which other jobs on a shared
machine disturb far less (with ``--threads 1`` no thread waits for a descheduled peer).
``x plain`` is the median over rounds of (case / plain in the same round).
Memory: peak RSS growth of one step in a fresh worker process (bench_loss's ``cpu_memory``).
Writes a CSV (every row carries device, versions and date), a sidecar ``.md`` with the
machine and the markdown table, and prints the table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_loss  # noqa: E402
from bench_loss import (DTYPES, RESULTS, environment, peak_rss_bytes, reset_peak_rss,  # noqa: E402
                        rss_bytes, write_csv)

CASES = ("plain", "group_ids", "label_smoothing", "image_to_text_weight", "hard_negatives", "all")
FIELDS = ["date", "device", "torch", "triton", "cuda", "python", "threads", "backend", "case", "options",
          "dtype", "n", "d", "m_neg_txt", "m_neg_img", "median_ms", "p20_ms", "p80_ms", "cpu_median_ms",
          "ratio", "cpu_ratio", "work", "extra_mib", "status"]


def case_spec(name: str, classes: int = 10, eps: float = 0.1, lam: float = 0.3,
              neg_frac: float = 0.25) -> Dict:
    """The options of case ``name`` as a JSON-able dict (it travels to the memory worker)."""
    if name not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {name!r}")
    every = name == "all"
    return {"name": name,
            "classes": classes if every or name == "group_ids" else None,
            "label_smoothing": eps if every or name == "label_smoothing" else 0.0,
            "image_to_text_weight": lam if every or name == "image_to_text_weight" else 0.5,
            "neg_frac": neg_frac if every or name == "hard_negatives" else 0.0}


def describe(spec: Dict) -> str:
    parts = []
    if spec["classes"] is not None:
        parts.append(f"group_ids: {spec['classes']} classes")
    if spec["label_smoothing"]:
        parts.append(f"label_smoothing={spec['label_smoothing']}")
    if spec["image_to_text_weight"] != 0.5:
        parts.append(f"image_to_text_weight={spec['image_to_text_weight']}")
    if spec["neg_frac"]:
        parts.append(f"hard negatives M_t = M_i = {spec['neg_frac']} N")
    return "; ".join(parts) or "none"


def n_negatives(spec: Dict, n: int) -> int:
    return int(round(spec["neg_frac"] * n))


def make_family_case(spec: Dict, n: int, d: int, dtype: torch.dtype, device: str, backend: str,
                     seed: int = 0):
    """``(loss_fn, args, call_kwargs, leaves)`` for one case: bench_loss's paired features,
    random class ids, and normalised hard negatives that require grad."""
    import clip_fast

    img, txt, scale = bench_loss.make_case(n, d, dtype, device, seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    kwargs = {}
    if spec["classes"] is not None:
        kwargs["group_ids"] = torch.randint(spec["classes"], (n,), generator=g).to(device)
    leaves = [img, txt, scale]
    m = n_negatives(spec, n)
    if m:
        for key in ("negative_text_features", "negative_image_features"):
            neg = F.normalize(torch.randn(m, d, generator=g), dim=-1)
            kwargs[key] = neg.to(device=device, dtype=dtype).requires_grad_(True)
            leaves.append(kwargs[key])
    loss_fn = clip_fast.FastClipLoss(backend=backend, label_smoothing=spec["label_smoothing"],
                                     image_to_text_weight=spec["image_to_text_weight"])
    return loss_fn, (img, txt, scale), kwargs, leaves


def step_fn(loss_fn, args, kwargs, leaves) -> Callable[[], None]:
    """One forward+backward, with the leaves' gradients cleared first (no accumulation add)."""
    def run():
        for t in leaves:
            t.grad = None
        loss_fn(*args, **kwargs).backward()
    return run


def time_step(fn) -> Tuple[float, float]:
    """(wall ms, process CPU ms) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3


def cpu_memory_worker(spec, n, d, dtype_name, backend) -> Dict:
    """Run in a fresh process: peak RSS growth of one step over the RSS with inputs alive."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    fn = step_fn(*make_family_case(spec, n, d, DTYPES[dtype_name], "cpu", backend))
    reset_peak_rss()
    base = rss_bytes()
    assert peak_rss_bytes() <= base + (16 << 20), "could not reset the peak RSS"
    fn()
    return {"extra_mib": max(0, peak_rss_bytes() - base) / 2**20}


def run_table(args) -> List[Dict]:
    env = dict(environment("cpu"), threads=torch.get_num_threads())
    rows, fns = [], {}
    specs = [case_spec(c, args.classes, args.eps, args.lam, args.neg_frac) for c in args.case]
    n, d = args.n, args.d
    for spec in specs:
        m = n_negatives(spec, n)
        row = dict(env, backend=args.backend, case=spec["name"], options=describe(spec),
                   dtype=args.dtype, n=n, d=d, m_neg_txt=m, m_neg_img=m,
                   work=(n * n + 2 * n * m) / (n * n), status="ok")
        try:
            if not args.no_memory:
                # bench_loss runs ``this script --worker-memory [spec, n, d, dtype, backend]``.
                row.update(bench_loss.cpu_memory(dict(spec, threads=args.threads), n, d, args.dtype,
                                                  args.backend, script=__file__))
            fns[spec["name"]] = step_fn(*make_family_case(spec, n, d, DTYPES[args.dtype], "cpu",
                                                          args.backend))
        except Exception as exc:  # recorded as the row's status
            row["status"] = f"failed: {type(exc).__name__}: {exc}"[:200]
        rows.append(row)
        print(f"prepared {spec['name']}: extra {row.get('extra_mib', float('nan')):.1f} MiB "
              f"{row['status']}", flush=True)
    for name, fn in fns.items():  # warm-up
        fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for r in range(args.reps):
        for name, fn in fns.items():
            w, c = time_step(fn)
            wall[name].append(w)
            cpu[name].append(c)
        print(f"round {r + 1}/{args.reps} (wall / CPU ms): "
              + ", ".join(f"{k} {wall[k][-1]:.0f} / {cpu[k][-1]:.0f}" for k in fns), flush=True)
    for row in rows:
        name = row["case"]
        if name not in wall:
            continue
        ts = sorted(wall[name])
        row.update(median_ms=statistics.median(ts), p20_ms=ts[int(0.2 * (len(ts) - 1))],
                   p80_ms=ts[int(round(0.8 * (len(ts) - 1)))], cpu_median_ms=statistics.median(cpu[name]))
        if "plain" in wall:  # per round, so a round's load cancels
            row["ratio"] = bench_loss.paired_ratio(wall[name], wall["plain"])
            row["cpu_ratio"] = bench_loss.paired_ratio(cpu[name], cpu["plain"])
    return rows


def markdown(rows: List[Dict]) -> str:
    lines = ["| case | options | wall ms, median (p20-p80) | x plain (wall) | CPU ms, median "
             "| x plain (CPU) | work x plain | extra MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"| {r['case']} | {r['options']} | {r['status']} | | | | | |")
            continue
        mem = f"{r['extra_mib']:.0f}" if "extra_mib" in r else "-"
        lines.append(f"| {r['case']} | {r['options']} | {r['median_ms']:.0f} ({r['p20_ms']:.0f}-{r['p80_ms']:.0f}) "
                     f"| {r.get('ratio', float('nan')):.3f} | {r['cpu_median_ms']:.0f} "
                     f"| {r.get('cpu_ratio', float('nan')):.3f} | {r['work']:.2f} | {mem} |")
    return "\n".join(lines)


def sidecar(rows: List[Dict], args, load_before, load_after) -> str:
    env = environment("cpu")
    return "\n".join([
        f"# CLIP loss family: option cost on CPU ({env['date']})", "",
        f"- machine: {env['device']}, {os.cpu_count()} CPUs visible, no GPU; shared with other jobs "
        f"(load average {load_before[0]:.2f} before, {load_after[0]:.2f} after), "
        f"{torch.get_num_threads()} torch thread(s)",
        f"- versions: torch {env['torch']}, python {env['python']}, {platform.platform()}",
        f"- shape: N = {args.n}, D = {args.d}, {args.dtype}, backend {args.backend}, forward+backward, "
        f"{args.reps} interleaved rounds after one warm-up; x plain: median over rounds of case / plain",
        f"- command: `python benchmarks/bench_family.py {' '.join(args.argv)}`".rstrip(), "",
        markdown(rows), ""])


def main(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--backend", default="torch", help="FastClipLoss backend (torch: the CPU backend)")
    p.add_argument("--case", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--classes", type=int, default=10, help="group_ids: number of classes")
    p.add_argument("--eps", type=float, default=0.1, help="label_smoothing")
    p.add_argument("--lam", type=float, default=0.3, help="image_to_text_weight")
    p.add_argument("--neg-frac", type=float, default=0.25, help="hard negatives per side, as a fraction of N")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    p.add_argument("--csv", default=None, help="CSV to append to (default: "
                                               "benchmarks/results/family_cpu_<date>.csv)")
    p.add_argument("--worker-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_memory:
        print(json.dumps(cpu_memory_worker(*json.loads(args.worker_memory))))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if "plain" not in args.case:
        args.case = ["plain", *args.case]  # the ratios need it
    args.argv = sys.argv[1:] if argv is None else list(argv)
    load_before = os.getloadavg()
    rows = run_table(args)
    table = markdown(rows)
    print(table)
    path = args.csv or os.path.join(RESULTS, f"family_cpu_{datetime.date.today().isoformat()}.csv")
    write_csv(rows, path, fields=FIELDS)
    with open(os.path.splitext(path)[0] + ".md", "w") as fh:
        fh.write(sidecar(rows, args, load_before, os.getloadavg()))
    print(f"wrote {path} and {os.path.splitext(path)[0]}.md")


if __name__ == "__main__":
    main()
