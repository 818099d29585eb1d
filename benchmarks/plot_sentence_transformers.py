"""Plot bench_sentence_transformers.py CSVs: time and extra memory of the loss stage per case,
as ratios to sentence-transformers' MultipleNegativesRankingLoss, one group of bars per N (each
N's ratios come from the run that measured it).

    python benchmarks/plot_sentence_transformers.py benchmarks/results/sentence_transformers_cpu_<date>*.csv [-o out.png]
"""
import argparse
import csv
import os

CASES = ("st_mnrl", "fast_mnrl", "st_cached", "fast_cached")
LABELS = {"st_mnrl": "MNRL (sentence-transformers)", "fast_mnrl": "FastMNRL (clip_fast)",
          "st_cached": "CachedMNRL (sentence-transformers)", "fast_cached": "FastCachedMNRL (clip_fast)"}


def plot(paths, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for path in [paths] if isinstance(paths, str) else paths:
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if r["status"] == "ok" and r["ratio"]]
    ns = sorted({int(r["n"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(CASES)
    for k, case in enumerate(CASES):
        for ax, key in zip(axes, ("ratio", "mem_ratio")):
            xs, ys = [], []
            for i, n in enumerate(ns):
                hit = [r for r in rows if r["case"] == case and int(r["n"]) == n]
                if hit:
                    xs.append(i + (k - 1.5) * width)
                    ys.append(float(hit[-1][key]))
            ax.bar(xs, ys, width, label=LABELS[case])
    first = rows[0]
    for ax, title in zip(axes, ("time / MNRL's (forward+backward)", "extra memory / MNRL's (peak RSS growth)")):
        ax.set_xticks(range(len(ns)), [f"N = {n}" for n in ns])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(title)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"MNRL loss stage, D={first['d']}, 1 hard-negative column, fp32: {first['device']}, torch "
                 f"{first['torch']}, sentence-transformers {first['sentence_transformers']}, {first['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("csv", nargs="+")
    p.add_argument("-o", "--out", default=None, help="default: the first CSV's name with .png")
    args = p.parse_args()
    print(f"wrote {plot(args.csv, args.out or os.path.splitext(args.csv[0])[0] + '.png')}")


if __name__ == "__main__":
    main()
