"""Rows, markdown tables and bar plots for the loss-stage benchmarks that compare every case
with one baseline case measured in the same run (bench_sentence_transformers.py,
bench_transformers.py, bench_matryoshka.py and their plot scripts).

A row holds the median wall and CPU time of a case, its paired ratios to the baseline
(``bench_loss.paired_ratio``: the median over rounds of case / baseline in the same round),
its extra memory and that memory's ratio to the baseline's.
"""
from __future__ import annotations

import csv
import os
import statistics
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import paired_ratio  # noqa: E402


def ratio_rows(env: Dict, n: int, times: Dict[str, Dict], mems: Dict[str, float], base: str,
               **extra) -> List[Dict]:
    """One row per case in ``times`` ({case: {"wall": [...], "cpu": [...]}}), with the ratios to
    ``base`` when the baseline was measured (a skipped baseline leaves them out)."""
    rows = []
    for case, t in times.items():
        row = dict(env, case=case, n=n, **extra, median_ms=1e3 * statistics.median(t["wall"]),
                   cpu_median_ms=1e3 * statistics.median(t["cpu"]), extra_mib=mems[case], status="ok")
        if base in times:
            row.update(ratio=paired_ratio(t["wall"], times[base]["wall"]),
                       cpu_ratio=paired_ratio(t["cpu"], times[base]["cpu"]),
                       mem_ratio=mems[case] / max(mems[base], 1e-9))
        rows.append(row)
    return rows


def _cell(row: Dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value in (None, "") else format(float(value), fmt)


def ratio_table(rows: Iterable[Dict], base: str, reps: bool = False) -> str:
    """A markdown table of ``ratio_rows`` (and skipped rows, which show their status)."""
    head = ["N", "case"] + (["reps"] if reps else []) + [
        "median ms", "CPU ms", f"x {base} (wall)", f"x {base} (CPU)", "extra MiB", f"x {base} (memory)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["n"]), r["case"]] + ([str(r.get("reps", ""))] if reps else [])
        if r["status"] != "ok":
            cells += [r["status"]] + [""] * (len(head) - len(cells) - 1)
        else:
            cells += [_cell(r, "median_ms", ".0f"), _cell(r, "cpu_median_ms", ".0f"), _cell(r, "ratio", ".2f"),
                      _cell(r, "cpu_ratio", ".2f"), _cell(r, "extra_mib", ".0f"), _cell(r, "mem_ratio", ".3f")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def read_rows(paths: Union[str, Sequence[str]]) -> List[Dict]:
    """The measured rows of one or more benchmark CSVs (skipped rows left out)."""
    rows = []
    for path in [paths] if isinstance(paths, str) else paths:
        with open(path, newline="") as f:
            rows += [r for r in csv.DictReader(f) if r["status"] == "ok"]
    return rows


def grouped_bars(rows: List[Dict], cases: Sequence[str], labels: Dict[str, str],
                 panels: Sequence[Tuple[str, str]], suptitle: str, out: str, log: bool = False,
                 figsize: Tuple[float, float] = (11, 4)) -> str:
    """One panel per (CSV column, title) in ``panels``: a group of bars per N, one bar per case
    (the last row of each (case, N) wins, so a later run replaces an earlier one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({int(r["n"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=figsize)
    width = 0.8 / len(cases)
    for k, case in enumerate(cases):
        for ax, (key, _) in zip(axes, panels):
            xs, ys = [], []
            for i, n in enumerate(ns):
                hit: Optional[Dict] = next((r for r in reversed(rows)
                                            if r["case"] == case and int(r["n"]) == n and r.get(key)), None)
                if hit is not None:
                    xs.append(i + (k - (len(cases) - 1) / 2) * width)
                    ys.append(float(hit[key]))
            ax.bar(xs, ys, width, label=labels[case])
    for ax, (_, title) in zip(axes, panels):
        ax.set_xticks(range(len(ns)), [f"N = {n}" for n in ns])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(title, fontsize=9)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
