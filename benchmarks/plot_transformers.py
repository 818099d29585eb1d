"""Plot a bench_transformers.py CSV: time and extra memory of CLIPModel's loss stage with the
switch, as ratios to transformers' own loss, one group of bars per N.

    python benchmarks/plot_transformers.py benchmarks/results/transformers_cpu_<date>.csv [-o out.png]
"""
import argparse
import os

from ratio_report import grouped_bars, read_rows

CASES = ("hf", "fast", "fast_none")
LABELS = {"hf": "transformers' loss", "fast": "clip_fast switch (logits kept)",
          "fast_none": "clip_fast switch, logits=\"none\""}
PANELS = (("ratio", "time / transformers' (forward+backward, wall)"),
          ("mem_ratio", "extra memory / transformers' (peak RSS growth)"))


def plot(path: str, out: str) -> str:
    rows = read_rows(path)
    first = rows[0]
    return grouped_bars(rows, CASES, LABELS, PANELS,
                        f"CLIPModel(return_loss=True) loss stage, projection {first['d']}, fp32: {first['device']} "
                        f"(shared), torch {first['torch']}, transformers {first['transformers']}, {first['date']}",
                        out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("csv")
    p.add_argument("-o", "--out", default=None, help="default: the CSV's name with .png")
    args = p.parse_args()
    print(f"wrote {plot(args.csv, args.out or os.path.splitext(args.csv)[0] + '.png')}")


if __name__ == "__main__":
    main()
