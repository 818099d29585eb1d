"""The loss stage of sentence-transformers' MNRL and cached MNRL against the fused twins, in one run.

    python benchmarks/bench_sentence_transformers.py                       # CPU: N=4096, D=384
    python benchmarks/bench_sentence_transformers.py --n 4096 16384 --reps 3

Cases (forward+backward of the loss stage on (anchor, positive, 1 hard negative) embeddings
of N rows, fp32, ``cos_sim``, scale 20; no model, so only the loss stage is timed):

    st_mnrl       MultipleNegativesRankingLoss.compute_loss_from_embeddings (N x 2N logits)
    fast_mnrl     FastMultipleNegativesRankingLoss's (clip_fast.clip_loss, ``--backend``)
    st_cached     CachedMultipleNegativesRankingLoss.calculate_loss(with_backward=True): its
                  loop over mini-batches of ``--mini-batch`` rows x all 2N candidates
    fast_cached   FastCachedMultipleNegativesRankingLoss.calculate_loss: one fused call

Time: the cases run interleaved in one process (a warm-up round, then ``--reps`` rounds of
one step per case), so every case sees the same machine load; the median wall and CPU time
(the process's, which other jobs on a shared machine disturb less), and ``ratio`` /
``cpu_ratio``: the median over rounds of (case / st_mnrl in the same round).
Memory: peak RSS growth of one step over the RSS with its inputs alive, in a fresh process
per case (``--worker-memory``).  A case whose logits would not fit ``--max-logit-gib`` is
skipped and says so.  Appends to a CSV under benchmarks/results/ whose rows carry the CPU,
versions and date, and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import (RESULTS, environment, interleaved_times, parse_or_serve, peak_rss_bytes,  # noqa: E402
                        reset_peak_rss, rss_bytes, write_csv)
from ratio_report import ratio_rows, ratio_table  # noqa: E402

CASES = ("st_mnrl", "fast_mnrl", "st_cached", "fast_cached")
FIELDS = ["date", "device", "torch", "triton", "python", "sentence_transformers", "threads", "backend", "case",
          "n", "d", "negatives", "mini_batch", "median_ms", "cpu_median_ms", "ratio", "cpu_ratio", "extra_mib",
          "mem_ratio",
          "status"]


def make_inputs(n: int, d: int, seed: int = 0) -> List[torch.Tensor]:
    """(anchor, positive, negative) fp32 embeddings of n rows, positives near their anchors."""
    gen = torch.Generator().manual_seed(seed)
    q, p, neg = (torch.randn(n, d, generator=gen) for _ in range(3))
    return [q, 0.8 * q + 0.6 * p, neg]


def build(case: str, backend: str, mini_batch: int):
    """The loss object of ``case`` (no model: only the loss stage is used)."""
    from clip_fast.integrations import sentence_transformers as fast
    from sentence_transformers.sentence_transformer import losses

    if case == "st_mnrl":
        return losses.MultipleNegativesRankingLoss(None)
    if case == "fast_mnrl":
        return fast.FastMultipleNegativesRankingLoss(None, backend=backend)
    if case == "st_cached":
        return losses.CachedMultipleNegativesRankingLoss(_NoModel(), mini_batch_size=mini_batch)
    if case == "fast_cached":
        return fast.FastCachedMultipleNegativesRankingLoss(_NoModel(), mini_batch_size=mini_batch, backend=backend)
    raise ValueError(f"case must be one of {CASES}, got {case!r}")


class _NoModel(torch.nn.Sequential):
    """Stands in for the model: the cached loss's constructor inspects its first module, the
    loss stage never calls it."""

    def __init__(self):
        super().__init__(torch.nn.Identity())


def step_fn(case: str, embeddings: List[torch.Tensor], backend: str, mini_batch: int) -> Callable[[], None]:
    """One forward+backward of ``case``'s loss stage; gradients land on leaf copies."""
    loss = build(case, backend, mini_batch)
    leaves = [e.clone().requires_grad_(True) for e in embeddings]
    if case.endswith("cached"):
        def run():
            reps = [[c.detach().requires_grad_(True) for c in e.split(mini_batch)] for e in leaves]
            loss.calculate_loss(reps, None, with_backward=True)
    else:
        def run():
            for x in leaves:
                x.grad = None
            loss.compute_loss_from_embeddings(leaves, None).backward()
    return run


def logit_gib(case: str, n: int, mini_batch: int) -> float:
    """The library's largest logit block (fp32), which autograd keeps a few copies of."""
    rows = n if case == "st_mnrl" else mini_batch if case == "st_cached" else 0
    return rows * 2 * n * 4 / 2**30


def memory_worker(case, n, d, backend, mini_batch) -> Dict:
    """Run in a fresh process: peak RSS growth of one step over the RSS with inputs alive."""
    fn = step_fn(case, make_inputs(n, d), backend, mini_batch)
    reset_peak_rss()
    base = rss_bytes()
    fn()
    return {"extra_mib": max(0, peak_rss_bytes() - base) / 2**20}


def memory(case, n, d, backend, mini_batch) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-memory", json.dumps([case, n, d, backend, mini_batch])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "worker failed")
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


def time_cases(cases, n, d, backend, mini_batch, reps) -> Dict[str, Dict]:
    """Interleaved rounds: {case: {wall: [...], cpu: [...]}} (the first round is a warm-up)."""
    embeddings = make_inputs(n, d)
    fns = {c: step_fn(c, embeddings, backend, mini_batch) for c in cases}
    return interleaved_times(fns, reps)


def run(args) -> List[Dict]:
    import clip_fast.integrations.sentence_transformers  # noqa: F401
    import sentence_transformers

    env = dict(environment("cpu"), sentence_transformers=sentence_transformers.__version__,
               threads=torch.get_num_threads(), backend=args.backend, d=args.d, negatives=1,
               mini_batch=args.mini_batch)
    rows = []
    for n in args.n:
        cases = [c for c in CASES if logit_gib(c, n, args.mini_batch) <= args.max_logit_gib]
        times = time_cases(cases, n, args.d, args.backend, args.mini_batch, args.reps)
        mems = {c: memory(c, n, args.d, args.backend, args.mini_batch) for c in cases}
        rows += ratio_rows(env, n, times, mems, "st_mnrl")
        rows += [dict(env, case=c, n=n, status=f"skipped: {logit_gib(c, n, args.mini_batch):.1f} GiB of logits "
                                               f"> --max-logit-gib {args.max_logit_gib}")
                 for c in CASES if c not in cases]
    return rows


def table(rows) -> str:
    return ratio_table(rows, "st_mnrl")


def main(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[4096])
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--mini-batch", type=int, default=32, help="the cached losses' mini_batch_size (library default)")
    p.add_argument("--backend", default="torch", help="clip_fast backend of the twins")
    p.add_argument("--max-logit-gib", type=float, default=4.0)
    p.add_argument("--out", default=None,
                   help="CSV path (default benchmarks/results/sentence_transformers_cpu_DATE.csv)")
    args = parse_or_serve(p, argv, memory_worker)
    if args is None:
        return
    rows = run(args)
    out = args.out or os.path.join(RESULTS, f"sentence_transformers_cpu_{rows[0]['date']}.csv")
    write_csv(rows, out, fields=FIELDS)
    print(f"{rows[0]['device']}, torch {rows[0]['torch']}, sentence-transformers "
          f"{rows[0]['sentence_transformers']}, {rows[0]['threads']} threads, {rows[0]['date']}; D={args.d}, "
          f"1 hard-negative column, fp32\n")
    print(table(rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
