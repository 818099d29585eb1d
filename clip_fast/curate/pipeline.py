"""The two passes over the shards, as pure per-shard functions and the drivers that map them.

* match: ``match_shard`` writes each caption's matched entries (under the rule of
  :mod:`clip_fast.curate.match`) and drops captions with none.
* balance, pass 1 (count): ``count_shard`` counts, per entry, the pairs that matched it
  (an entry counts once per pair).  The driver adds the shards' counts.
* balance, pass 2 (sample): ``sample_shard`` gives each entry e MetaCLIP's probability
  p_e = min(1, t / count(e)) and combines a pair's entries by one of two rules:

      any (default):  p(pair) = 1 - prod over e of (1 - p_e)
      max:            p(pair) = max over e of p_e

  ``any`` is MetaCLIP's: its ``balancing.py`` draws once per entry and keeps the pair
  if any draw succeeds, and its ``curate.py`` computes the product directly.  ``max``
  keeps a pair with the chance of its rarest entry, so it keeps fewer pairs whenever a
  pair holds two or more head entries (counts 2,050 and 2,000 at t = 200: 0.100 against
  0.188).  Under both, a pair holding a tail entry (count <= t) is kept for sure, and
  an entry whose pairs hold no other entry keeps t pairs in expectation; an entry that
  shares pairs with others keeps more.

Each shard draws from its own generator, seeded with ``(seed, shard index)``, one
uniform number per pair in file order, compared with p(pair): for ``any`` this has the
same distribution as MetaCLIP's one draw per entry.  The result depends on the seed and
the shard list, not on which worker ran which shard or when.

A ``mapper(fn, items)`` returns ``[fn(x) for x in items]`` in order.  The default runs
in this process with a progress bar; :func:`dask_mapper` runs the same functions on a
Dask cluster (``dask.distributed``), which is how the passes scale past one machine.
"""
from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .errors import CurateError
from .shards import Layout, concat_csv, expand_inputs, filter_shard, shard_format

# MetaCLIP's t for 400M pairs (CLIP's WIT-400M); MetaCLIP 2.5B uses 170,000.
DEFAULT_MAX_PER_QUERY = 20_000
COMBINE_RULES = ("any", "max")
DEFAULT_COMBINE = "any"

Mapper = Callable[[Callable, Sequence], List]


def local_mapper(desc: str = "shards", progress: bool = True) -> Mapper:
    """Run tasks one after another in this process, with a tqdm progress bar over shards."""

    def run(fn, items):
        items = list(items)
        if progress:
            from tqdm import tqdm

            return [fn(x) for x in tqdm(items, desc=desc, unit="shard")]
        return [fn(x) for x in items]

    return run


def dask_mapper(client, progress: bool = False) -> Mapper:
    """Run tasks on a ``dask.distributed.Client``; results come back in input order."""

    def run(fn, items):
        futures = client.map(fn, list(items), pure=False)
        if progress:
            from dask.distributed import progress as dask_progress

            dask_progress(futures)
        return client.gather(futures)

    return run


# ---------------------------------------------------------------------- per shard


def match_shard(task: Tuple[str, str], queries_path: str, layout: Layout, out_base: Optional[str] = None,
                rule: str = "metaclip") -> Tuple[int, int]:
    """Match one shard: ``task = (input path, output path)``; returns (read, kept)."""
    from .match import matcher_for

    in_path, out_path = task
    matcher = matcher_for(queries_path, rule)

    def decide(_, caption, __):
        found = matcher.match(caption)
        return found or None

    return filter_shard(in_path, out_path, layout, decide, want_matches=False, out_base=out_base)


def count_shard(path: str, layout: Layout) -> Counter:
    """Pairs per entry in one matched shard (each entry once per pair)."""
    counts: Counter = Counter()

    def decide(_, __, matches):
        counts.update(set(matches))
        return None

    filter_shard(path, None, layout, decide, want_matches=True)
    return counts


def check_combine(combine: str) -> str:
    if combine not in COMBINE_RULES:
        raise CurateError(f"combine must be one of {', '.join(COMBINE_RULES)}; got {combine!r}")
    return combine


def keep_probability(matches: Sequence[str], counts: Dict[str, int], t: int,
                     combine: str = DEFAULT_COMBINE) -> float:
    """p(pair) from p_e = min(1, t / count(e)) over the pair's distinct entries:
    ``any``: 1 - prod(1 - p_e); ``max``: max p_e.  0 for a pair with no entry."""
    check_combine(combine)
    p_max, p_none = 0.0, 1.0  # the largest p_e; the chance that no entry's draw succeeds
    for e in set(matches):
        c = counts.get(e, 0)
        if c <= t:
            return 1.0
        p_max = max(p_max, t / c)
        p_none *= 1.0 - t / c
    return p_max if combine == "max" else 1.0 - p_none


@dataclass
class SampleResult:
    read: int = 0
    kept: int = 0
    kept_counts: Counter = field(default_factory=Counter)     # entry -> kept pairs
    expected: Dict[str, float] = field(default_factory=dict)  # entry -> sum of p over its pairs


def sample_shard(task: Tuple[int, str, str], counts: Dict[str, int], t: int, seed: int,
                 layout: Layout, out_base: Optional[str] = None,
                 combine: str = DEFAULT_COMBINE) -> SampleResult:
    """Sample one matched shard: ``task = (shard index, input path, output path)``."""
    import numpy as np

    check_combine(combine)
    index, in_path, out_path = task
    rng = np.random.default_rng([seed, index])
    res = SampleResult()
    expected: Dict[str, float] = {}

    def decide(_, __, matches):
        entries = set(matches)
        p = keep_probability(entries, counts, t, combine)
        for e in entries:
            expected[e] = expected.get(e, 0.0) + p
        if rng.random() < p:
            res.kept_counts.update(entries)
            return matches
        return None

    res.read, res.kept = filter_shard(in_path, out_path, layout, decide, want_matches=True,
                                      out_base=out_base)
    res.expected = expected
    return res


# ------------------------------------------------------------------------ drivers


def _out_paths(shards: List[str], out_dir: str) -> List[str]:
    return [os.path.join(out_dir, os.path.basename(s)) for s in shards]


def run_match(spec: str, queries_path: str, out_dir: str, layout: Layout = Layout(),
              mapper: Optional[Mapper] = None, rule: str = "metaclip") -> Dict[str, int]:
    """Match every shard of ``spec`` into ``out_dir`` (same file names) under ``rule``
    (``"metaclip"`` or ``"lenient"``, see :mod:`clip_fast.curate.match`)."""
    from .match import check_rule
    from .queries import read_queries

    check_rule(rule)
    shards = expand_inputs(spec)
    read_queries(queries_path)  # fail on an empty or malformed list before any work
    os.makedirs(out_dir, exist_ok=True)
    outs = _out_paths(shards, out_dir)
    clash = [s for s, o in zip(shards, outs) if os.path.abspath(s) == os.path.abspath(o)]
    if clash:
        raise CurateError(f"{clash[0]}: the output folder holds the input; pick another --out")
    mapper = mapper or local_mapper("match")
    fn = functools.partial(match_shard, queries_path=os.path.abspath(queries_path), layout=layout,
                           rule=rule)
    results = mapper(fn, list(zip(shards, outs)))
    return {"shards": len(shards), "read": sum(r for r, _ in results),
            "kept": sum(k for _, k in results)}


def run_count(shards: List[str], layout: Layout = Layout(), mapper: Optional[Mapper] = None) -> Counter:
    """Pass 1: pairs per entry over all matched shards."""
    mapper = mapper or local_mapper("count")
    total: Counter = Counter()
    for c in mapper(functools.partial(count_shard, layout=layout), shards):
        total.update(c)
    return total


@dataclass
class BalanceResult:
    counts: Counter           # entry -> pairs before balancing
    kept_counts: Counter      # entry -> pairs after
    expected: Dict[str, float]
    read: int
    kept: int
    outputs: List[str]        # the balanced tar shards, or [balanced.csv]
    combine: str = DEFAULT_COMBINE


def run_balance(spec: str, out_dir: str, t: int = DEFAULT_MAX_PER_QUERY, seed: int = 0,
                layout: Layout = Layout(), mapper: Optional[Mapper] = None,
                count_mapper: Optional[Mapper] = None, combine: str = DEFAULT_COMBINE) -> BalanceResult:
    """Count, then sample, every matched shard of ``spec`` into ``out_dir``; ``combine``
    is the rule that turns a pair's entries into its keep probability (module doc).

    Tar shards are written as ``out_dir/<name>.tar``.  CSV shards are written to
    ``out_dir/shards/`` with image paths relative to ``out_dir``, then concatenated into
    ``out_dir/balanced.csv`` (the trainer reads one CSV) and removed.
    """
    if t < 1:
        raise ValueError(f"max per query must be >= 1, got {t}")
    check_combine(combine)
    shards = expand_inputs(spec)
    fmt = shard_format(shards[0])
    os.makedirs(out_dir, exist_ok=True)
    shard_dir = os.path.join(out_dir, "shards") if fmt == "csv" else out_dir
    os.makedirs(shard_dir, exist_ok=True)
    outs = _out_paths(shards, shard_dir)
    if any(os.path.abspath(s) == os.path.abspath(o) for s, o in zip(shards, outs)):
        raise CurateError(f"{shards[0]}: the output folder holds the input; pick another --out")
    counts = run_count(shards, layout, count_mapper or mapper)
    if not counts:
        raise CurateError(f"{spec!r}: no matched pairs to balance")
    fn = functools.partial(sample_shard, counts=dict(counts), t=t, seed=seed, layout=layout,
                           out_base=out_dir, combine=combine)
    mapper = mapper or local_mapper("sample")
    results = mapper(fn, [(i, s, o) for i, (s, o) in enumerate(zip(shards, outs))])
    kept_counts: Counter = Counter()
    expected: Dict[str, float] = {}
    for r in results:
        kept_counts.update(r.kept_counts)
        for e, v in r.expected.items():
            expected[e] = expected.get(e, 0.0) + v
    outputs = list(outs)
    if fmt == "csv":
        merged = os.path.join(out_dir, "balanced.csv")
        concat_csv(outs, merged, layout.separator)
        for o in outs:
            os.remove(o)
        if not os.listdir(shard_dir):
            os.rmdir(shard_dir)
        outputs = [merged]
    return BalanceResult(counts, kept_counts, expected, sum(r.read for r in results),
                         sum(r.kept for r in results), outputs, combine)


# ------------------------------------------------------------------------- report


def write_report(res: BalanceResult, t: int, csv_path: str, png_path: Optional[str]) -> None:
    """Per-entry counts before and after, and the expected count after under the
    combine rule in use (the sum of p(pair) over the entry's pairs), head first; a PNG of
    count against rank before and after, the head (count > t) and the tail apart."""
    import csv as _csv

    order = sorted(res.counts, key=lambda e: (-res.counts[e], e))
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        w = _csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["entry", "count_before", "count_after", "expected_after", "part"])
        for e in order:
            w.writerow([e, res.counts[e], res.kept_counts.get(e, 0),
                        f"{res.expected.get(e, 0.0):.3f}", "head" if res.counts[e] > t else "tail"])
    if png_path is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rank = range(1, len(order) + 1)
    before = [res.counts[e] for e in order]
    after = [max(res.kept_counts.get(e, 0), 0.5) for e in order]  # 0 drawn at 0.5 on a log axis
    n_head = sum(1 for c in before if c > t)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.loglog(rank, before, label=f"before ({res.read} pairs)", lw=1.5)
    ax.loglog(rank, after, ".", ms=2, label=f"after ({res.kept} pairs)")
    ax.axhline(t, color="k", ls="--", lw=0.8, label=f"t = {t}")
    if 0 < n_head < len(order):
        ax.axvline(n_head + 0.5, color="grey", ls=":", lw=0.8)
    head_before = sum(before[:n_head])
    head_after = sum(res.kept_counts.get(e, 0) for e in order[:n_head])
    ax.set_title(f"pairs per entry ({res.combine} rule): head {n_head} entries "
                 f"({head_before} -> {head_after} pairs), tail {len(order) - n_head} entries",
                 fontsize=9)
    ax.set_xlabel("entry rank (by count before)")
    ax.set_ylabel("pairs matching the entry")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)

