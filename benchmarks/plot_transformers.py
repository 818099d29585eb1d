"""Plot a bench_transformers.py CSV: time and extra memory of CLIPModel's loss stage with the
switch, as ratios to transformers' own loss, one group of bars per N.

    python benchmarks/plot_transformers.py benchmarks/results/transformers_cpu_<date>.csv [-o out.png]
"""
import argparse
import csv
import os

CASES = ("hf", "fast", "fast_none")
LABELS = {"hf": "transformers' loss", "fast": "clip_fast switch (logits kept)",
          "fast_none": "clip_fast switch, logits=\"none\""}
PANELS = (("ratio", "time / transformers' (forward+backward, wall)"),
          ("mem_ratio", "extra memory / transformers' (peak RSS growth)"))


def plot(path: str, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    ns = sorted({int(r["n"]) for r in rows})
    fig, axes = plt.subplots(1, len(PANELS), figsize=(11, 4))
    width = 0.8 / len(CASES)
    for k, case in enumerate(CASES):
        for ax, (key, _) in zip(axes, PANELS):
            xs, ys = [], []
            for i, n in enumerate(ns):
                hit = [r for r in rows if r["case"] == case and int(r["n"]) == n and r[key]]
                if hit:
                    xs.append(i + (k - 1) * width)
                    ys.append(float(hit[-1][key]))
            ax.bar(xs, ys, width, label=LABELS[case])
    first = rows[0]
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_xticks(range(len(ns)), [f"N = {n}" for n in ns])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"CLIPModel(return_loss=True) loss stage, projection {first['d']}, fp32: {first['device']} "
                 f"(shared), torch {first['torch']}, transformers {first['transformers']}, {first['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("csv")
    p.add_argument("-o", "--out", default=None, help="default: the CSV's name with .png")
    args = p.parse_args()
    print(f"wrote {plot(args.csv, args.out or os.path.splitext(args.csv)[0] + '.png')}")


if __name__ == "__main__":
    main()
