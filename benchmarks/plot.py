"""Plot a bench_loss.py CSV: time and extra memory against N, one line per loss.

    python benchmarks/plot.py benchmarks/results/loss_cpu_2026-11-27.csv [-o out.png] [--dtype fp32 --d 512]
"""
import argparse
import csv
import os
from collections import defaultdict
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(csv_path: str, out: Optional[str] = None, dtype: Optional[str] = None,
         d: Optional[int] = None, loss_name: str = "CLIP loss") -> str:
    """Time and extra memory against N (log axes) for one dtype and D; returns the PNG's path
    (default: the CSV's name with ``_<dtype>_d<D>.png``)."""
    with open(csv_path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "ok" and r["median_ms"]]
    if not rows:
        raise SystemExit(f"{csv_path}: no rows with status ok and a time")
    dtype = dtype or rows[0]["dtype"]
    d = d or int(rows[0]["d"])
    rows = [r for r in rows if r["dtype"] == dtype and int(r["d"]) == d]
    series = defaultdict(list)
    for r in rows:
        series[r["impl"]].append((int(r["n"]), float(r["median_ms"]), float(r["extra_mib"])))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, pts in sorted(series.items()):
        pts.sort()
        ns = [p[0] for p in pts]
        ax_t.plot(ns, [p[1] for p in pts], marker="o", label=impl)
        ax_m.plot(ns, [max(p[2], 1e-3) for p in pts], marker="o", label=impl)
    for ax, label in ((ax_t, "forward+backward time (ms)"), (ax_m, "extra peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"{loss_name}, D={d}, {dtype}: {r0['device']}, torch {r0['torch']}, triton {r0['triton']}, {r0['date']}",
                 fontsize=9)
    fig.tight_layout()
    out = out or os.path.splitext(csv_path)[0] + f"_{dtype}_d{d}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("csv")
    p.add_argument("-o", "--out", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--d", type=int, default=None)
    args = p.parse_args()
    print(f"wrote {plot(args.csv, args.out, args.dtype, args.d)}")


if __name__ == "__main__":
    main()
