"""Captions per second for ``clip_fast.curate`` matching against the full default query
list, on 1 and 2 worker processes, and the memory it takes.

    python benchmarks/bench_curate_match.py                      # 200,000 captions
    python benchmarks/bench_curate_match.py --captions 50000 --queries queries.tsv

The list is the CLI's default (``python -m clip_fast.curate queries``: wordfreq words
with count >= 100 at 4e9 words, wordsegment bigrams with PMI >= 8 bits, WordNet 3.0),
built once and reused from ``--queries`` when that file exists.  Captions are synthetic:
6 to 16 words drawn from wordfreq's 30,000 most frequent English words by frequency,
seeded, so a rerun reads the same text; real alt-text is longer-tailed, so the match
rate here is indicative.

What is measured:
* ``build_s``: reading the list and building the Aho-Corasick automaton;
* ``matcher_mib``: RSS after the build minus before (the automaton and the entry list);
* ``captions_per_s``: captions matched per second of wall time, the median of
  ``--reps`` runs; with 2 workers the captions are split between two forked processes
  that share the parent's automaton (copy-on-write), as ``multiprocessing`` gives;
* ``peak_rss_mib``: the parent's VmHWM from just before the build (it holds torch, imported by ``clip_fast``, the
  list and the captions) and ``worker_peak_rss_mib``, the largest worker's VmHWM
  (pages shared with the parent counted in full);
* ``load_avg_1m``: the machine's load after the run; above the core count, other jobs
  were sharing the cores and the 2-worker figure is low.

Results are appended to ``benchmarks/results/curate_match_cpu_<date>.csv`` with the CPU,
the versions and the date.  The machine's 2 cores may be shared: figures are a floor.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from typing import List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import cpu_name, peak_rss_bytes, reset_peak_rss, rss_bytes, write_csv  # noqa: E402  (shared)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIELDS = ["date", "cpu", "cores", "python", "pyahocorasick", "wordfreq", "nltk", "n_entries",
          "n_captions", "mean_words", "matched_frac", "mean_matches", "workers", "captions_per_s",
          "build_s", "matcher_mib", "peak_rss_mib", "worker_peak_rss_mib", "load_avg_1m", "note"]

_MATCHER = None  # set in the parent before forking, read by the workers


def synthetic_captions(n: int, seed: int = 0) -> List[str]:
    """n captions of 6..16 words drawn by frequency from wordfreq's top 30,000 English words."""
    import numpy as np
    import wordfreq

    words = [w for w in wordfreq.top_n_list("en", 30000, wordlist="large") if w.isalpha()]
    p = np.array([wordfreq.word_frequency(w, "en", wordlist="large") for w in words])
    p /= p.sum()
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, 17, size=n)
    ids = rng.choice(len(words), size=int(lengths.sum()), p=p)
    out, k = [], 0
    for n_words in lengths:
        out.append(" ".join(words[i] for i in ids[k:k + n_words]))
        k += n_words
    return out


def _match_chunk(bounds):
    """Match captions[lo:hi]; returns this process's peak RSS in bytes."""
    lo, hi = bounds
    match = _MATCHER.match
    for cap in _CAPTIONS[lo:hi]:
        match(cap)
    return peak_rss_bytes()


_CAPTIONS: List[str] = []


def run(workers: int, n: int):
    """(seconds, largest worker peak RSS in bytes or None) to match all captions with
    ``workers`` processes (1: in this process)."""
    t0 = time.perf_counter()
    if workers == 1:
        _match_chunk((0, n))
        return time.perf_counter() - t0, None
    step = -(-n // (workers * 8))  # 8 chunks per worker balance the two cores
    chunks = [(i, min(i + step, n)) for i in range(0, n, step)]
    with mp.get_context("fork").Pool(workers) as pool:
        peaks = pool.map(_match_chunk, chunks)
    return time.perf_counter() - t0, max(peaks)


def main(argv=None):
    global _MATCHER, _CAPTIONS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=200_000)
    ap.add_argument("--queries", default=os.path.join(tempfile.gettempdir(), "clip_fast_default_queries.tsv"),
                    help="the default list, built here when the file does not exist")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", default="")
    ap.add_argument("--match", choices=("metaclip", "lenient"), default="metaclip",
                    help="the matching rule (recorded in the note column)")
    args = ap.parse_args(argv)
    args.note = " ".join(x for x in (f"match={args.match}", args.note) if x)

    from clip_fast.curate import queries as q
    from clip_fast.curate.match import Matcher

    if not os.path.exists(args.queries):
        # Built by the CLI in its own process, so its memory is not in this one's peak.
        os.makedirs(os.path.dirname(os.path.abspath(args.queries)), exist_ok=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "clip_fast.curate", "queries", "--out", args.queries],
                       check=True)
        print(f"built the default list in {time.perf_counter() - t0:.1f}s -> {args.queries}", file=sys.stderr)
    _CAPTIONS = synthetic_captions(args.captions)
    reset_peak_rss()  # the peak from here on: the matcher and the runs, not the caption generator
    before = rss_bytes()
    t0 = time.perf_counter()
    _MATCHER = Matcher(q.read_queries(args.queries), args.match)
    build_s = time.perf_counter() - t0
    matcher_mib = (rss_bytes() - before) / 2**20
    hits = [len(_MATCHER.match(c)) for c in _CAPTIONS[:20000]]
    row0 = {
        "date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
        "python": platform.python_version(), "pyahocorasick": version("pyahocorasick"),
        "wordfreq": version("wordfreq"), "nltk": version("nltk"), "n_entries": len(_MATCHER),
        "n_captions": args.captions,
        "mean_words": sum(len(c.split()) for c in _CAPTIONS) / len(_CAPTIONS),
        "matched_frac": sum(h > 0 for h in hits) / len(hits), "mean_matches": sum(hits) / len(hits),
        "build_s": build_s, "matcher_mib": matcher_mib, "note": args.note,
    }
    rows = []
    for w in args.workers:
        runs = [run(w, args.captions) for _ in range(args.reps)]
        times = [t for t, _ in runs]
        child = max(p for _, p in runs) / 2**20 if w > 1 else ""
        rows.append(dict(row0, workers=w, captions_per_s=args.captions / statistics.median(times),
                         peak_rss_mib=peak_rss_bytes() / 2**20, worker_peak_rss_mib=child,
                         load_avg_1m=os.getloadavg()[0]))
        print(f"workers={w}: {rows[-1]['captions_per_s']:.0f} captions/s "
              f"(entries {len(_MATCHER)}, build {build_s:.1f}s, matcher {matcher_mib:.0f} MiB, "
              f"peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB)")
    out = args.out or os.path.join(RESULTS, f"curate_match_cpu_{row0['date']}.csv")
    write_csv(rows, out, FIELDS, float_format=".3f")
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
