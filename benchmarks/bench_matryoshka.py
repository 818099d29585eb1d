"""The Matryoshka loss in one sweep against the per-size loops, in one run (CPU).

    python benchmarks/bench_matryoshka.py                                   # N=8192, dims 64..768
    python benchmarks/bench_matryoshka.py --n 1024 --dims 16 32 64 --reps 1  # a quick look
    python benchmarks/bench_matryoshka.py --device cuda --backends torch,triton --dtype bfloat16 \
        --n 65536 --dims 64 128 256 512 768 --out $OUT/matryoshka_gpu.csv   # the GPU rows

Cases (forward+backward of the loss on (anchor, positive) fp32 embeddings of N rows,
MNRL's loss: image->text cross-entropy at scale 20, each prefix L2-normalised, weights 1):

    st_loop      sentence-transformers' MatryoshkaLoss(MultipleNegativesRankingLoss) stage:
                 per size, the library's ``shrink`` then MNRL's ``compute_loss_from_embeddings``
                 (N x N logits per size)
    fast_loop    clip_fast's own per-size loop: ``clip_loss`` on each normalised prefix
    fast_sweep   ``clip_loss(..., matryoshka_dims=dims)``: every size in one sweep
    fast_loop_triton, fast_sweep_triton   the same on backend="triton" (``--backends torch,triton``)

``--device cuda`` times on the GPU (synchronised; memory: peak allocated growth, in process);
``st_loop`` is skipped where sentence-transformers is not installed (ratios are then to the
first case).  ``--dtype`` sets the embeddings' dtype (default float32).

Time: the cases run interleaved in one process (a warm-up round, then ``--reps`` rounds), so
each sees the same machine load; ``ratio`` / ``cpu_ratio`` are medians over rounds of (case /
st_loop in the same round).  Memory: peak RSS growth of one step over the RSS with its inputs
alive, in a fresh process per case.  Appends to benchmarks/results/matryoshka_cpu_DATE.csv
(rows carry the CPU, versions and date), prints a markdown table, and ``--plot`` draws it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import (RESULTS, environment, interleaved_times, peak_rss_bytes, reset_peak_rss,  # noqa: E402
                        rss_bytes, write_csv)
from ratio_report import ratio_rows, ratio_table  # noqa: E402

CASES = ("st_loop", "fast_loop", "fast_sweep")
LABELS = {"st_loop": "MatryoshkaLoss(MNRL)\n(sentence-transformers)", "fast_loop": "clip_loss per size\n(clip_fast)",
          "fast_sweep": "clip_loss(matryoshka_dims)\none sweep (clip_fast)"}
FIELDS = ["date", "device", "torch", "triton", "python", "sentence_transformers", "threads", "case", "n", "dims",
          "median_ms", "cpu_median_ms", "ratio", "cpu_ratio", "extra_mib", "mem_ratio", "status"]
SCALE = 20.0


def make_inputs(n: int, d: int, seed: int = 0, device: str = "cpu", dtype=torch.float32) -> List[torch.Tensor]:
    """(anchor, positive) embeddings of n rows, positives near their anchors."""
    gen = torch.Generator().manual_seed(seed)
    q, p = (torch.randn(n, d, generator=gen) for _ in range(2))
    return [t.to(device=device, dtype=dtype) for t in (q, 0.8 * q + 0.6 * p)]


def cases(backends: Sequence[str]) -> List[str]:
    """st_loop (when sentence-transformers imports), then each backend's loop and sweep."""
    try:
        import sentence_transformers  # noqa: F401
        out = ["st_loop"]
    except ImportError:
        out = []
    for b in backends:
        out += ["fast_loop", "fast_sweep"] if b == "torch" else [f"fast_loop_{b}", f"fast_sweep_{b}"]
    return out


def loss_fn(case: str, dims: Sequence[int]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    import clip_fast

    backend = case.split("_")[2] if case.count("_") == 2 else "torch"
    case = "_".join(case.split("_")[:2])

    if case == "st_loop":
        from sentence_transformers.sentence_transformer import losses
        from sentence_transformers.sentence_transformer.losses.matryoshka import shrink

        mnrl = losses.MultipleNegativesRankingLoss(None, scale=SCALE)
        return lambda q, p: sum(mnrl.compute_loss_from_embeddings([shrink(q, d), shrink(p, d)], None) for d in dims)
    if case == "fast_loop":
        return lambda q, p: sum(clip_fast.clip_loss(F.normalize(q[:, :d], dim=1), F.normalize(p[:, :d], dim=1),
                                                    SCALE, image_to_text_weight=1.0, backend=backend) for d in dims)
    if case == "fast_sweep":
        return lambda q, p: clip_fast.clip_loss(q, p, SCALE, image_to_text_weight=1.0, backend=backend,
                                                matryoshka_dims=tuple(dims))
    raise ValueError(f"case must be one of {CASES}, got {case!r}")


def step_fn(case: str, embeddings: List[torch.Tensor], dims: Sequence[int]) -> Callable[[], None]:
    """One forward+backward of ``case`` (synchronised on a GPU); gradients land on leaf copies."""
    fn = loss_fn(case, dims)
    q, p = (e.clone().requires_grad_(True) for e in embeddings)

    def run():
        q.grad = p.grad = None
        fn(q, p).backward()
        if q.is_cuda:
            torch.cuda.synchronize()
    return run


def _fails(fn) -> str:
    """"" when one step runs, else why not (a GPU out of memory; the other cases still run)."""
    try:
        fn()
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        return f"out of memory: {str(exc).splitlines()[0][:80]}"
    return ""


def cuda_memory(case, n, dims, dtype) -> float:
    """Peak allocated growth (MiB) of one step over the allocation with its inputs alive."""
    fn = step_fn(case, make_inputs(n, max(dims), device="cuda", dtype=dtype), dims)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return max(0, torch.cuda.max_memory_allocated() - base) / 2**20


def memory_worker(case, n, dims) -> Dict:
    fn = step_fn(case, make_inputs(n, max(dims)), dims)
    reset_peak_rss()
    base = rss_bytes()
    fn()
    return {"extra_mib": max(0, peak_rss_bytes() - base) / 2**20}


def memory(case, n, dims) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-memory", json.dumps([case, n, list(dims)])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "worker failed")
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


def run(args) -> Iterator[List[Dict]]:
    """The rows of each N in turn (so a caller can write them before the next, larger N)."""
    try:
        import sentence_transformers
        st_version = sentence_transformers.__version__
    except ImportError:
        st_version = "none"
    dtype = getattr(torch, args.dtype)
    env = dict(environment(args.device), sentence_transformers=st_version,
               threads=torch.get_num_threads(), dims=" ".join(map(str, args.dims)))
    if args.device == "cuda" or args.dtype != "float32":
        env["device"] = f"{env['device']} {args.dtype}"
    names = cases(args.backends.split(","))
    for n in args.n:
        fns = {c: step_fn(c, make_inputs(n, max(args.dims), device=args.device, dtype=dtype), args.dims)
               for c in names}
        failed = {c: status for c in names if (status := _fails(fns[c]))}
        live = [c for c in names if c not in failed]
        rows = [dict(env, case=c, n=n, status=failed[c]) for c in failed]
        if live:
            times = interleaved_times({c: fns[c] for c in live}, args.reps)
            del fns
            mems = {c: cuda_memory(c, n, args.dims, dtype) if args.device == "cuda" else memory(c, n, args.dims)
                    for c in live}
            # Ratios to sentence-transformers' loop; none where it did not run (out of memory).
            rows = ratio_rows(env, n, times, mems, "st_loop") + rows
        yield rows


def table(rows) -> str:
    return ratio_table(rows, "st_loop")


def plot(rows, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = rows[-1]["n"]
    last = {r["case"]: r for r in rows if r["n"] == n}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in zip(axes, ("ratio", "mem_ratio"),
                              ("time / MatryoshkaLoss(MNRL)'s (fwd+bwd)", "extra memory / MatryoshkaLoss(MNRL)'s")):
        ax.bar(range(len(CASES)), [float(last[c][key]) for c in CASES], color=["C0", "C1", "C2"])
        ax.set_xticks(range(len(CASES)), [LABELS[c] for c in CASES], fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(title, fontsize=9)
    r = rows[-1]
    fig.suptitle(f"Matryoshka loss, dims ({r['dims']}), N = {n}: {r['device']}, torch {r['torch']}, "
                 f"{r['date']} (shared CPU)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[8192])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256, 512, 768])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backends", default="torch", help="comma list among torch,triton (default torch)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--out", default=None, help="CSV path (default benchmarks/results/matryoshka_cpu_DATE.csv)")
    p.add_argument("--plot", action="store_true", help="also write the CSV's PNG beside it")
    p.add_argument("--replot", default=None, metavar="CSV", help="only draw an existing CSV's PNG beside it")
    p.add_argument("--worker-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any(b not in ("torch", "triton") for b in args.backends.split(",")):
        p.error(f"--backends takes a comma list among torch,triton, got {args.backends!r}")
    if args.replot:
        import csv

        with open(args.replot, newline="") as fh:
            print(f"wrote {plot(list(csv.DictReader(fh)), args.replot[:-4] + '.png')}")
        return
    if args.worker_memory:
        print(json.dumps(memory_worker(*json.loads(args.worker_memory))))
        return
    out, rows = args.out, []
    for n_rows in run(args):
        out = out or os.path.join(RESULTS, f"matryoshka_{args.device}_{n_rows[0]['date']}.csv")
        write_csv(n_rows, out, fields=FIELDS)
        if not rows:
            r = n_rows[0]
            print(f"{r['device']}, torch {r['torch']}, sentence-transformers {r['sentence_transformers']}, "
                  f"{r['threads']} threads, {r['date']}; dims {args.dims}, {args.dtype}"
                  f"{', shared CPU' if args.device == 'cpu' else ''}\n", flush=True)
        print(table(n_rows), flush=True)
        rows += n_rows
    if args.plot:
        print(f"wrote {plot(rows, out[:-4] + '.png')}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
