"""Plot bench_sentence_transformers.py CSVs: time and extra memory of the loss stage per case,
as ratios to sentence-transformers' MultipleNegativesRankingLoss, one group of bars per N (each
N's ratios come from the run that measured it).

    python benchmarks/plot_sentence_transformers.py benchmarks/results/sentence_transformers_cpu_<date>*.csv [-o out.png]
"""
import argparse
import os

from ratio_report import grouped_bars, read_rows

CASES = ("st_mnrl", "fast_mnrl", "st_cached", "fast_cached")
LABELS = {"st_mnrl": "MNRL (sentence-transformers)", "fast_mnrl": "FastMNRL (clip_fast)",
          "st_cached": "CachedMNRL (sentence-transformers)", "fast_cached": "FastCachedMNRL (clip_fast)"}
PANELS = (("ratio", "time / MNRL's (forward+backward)"), ("mem_ratio", "extra memory / MNRL's (peak RSS growth)"))


def plot(paths, out: str) -> str:
    rows = read_rows(paths)
    first = rows[0]
    return grouped_bars(rows, CASES, LABELS, PANELS,
                        f"MNRL loss stage, D={first['d']}, 1 hard-negative column, fp32: {first['device']}, torch "
                        f"{first['torch']}, sentence-transformers {first['sentence_transformers']}, {first['date']}",
                        out, log=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("csv", nargs="+")
    p.add_argument("-o", "--out", default=None, help="default: the first CSV's name with .png")
    args = p.parse_args()
    print(f"wrote {plot(args.csv, args.out or os.path.splitext(args.csv[0])[0] + '.png')}")


if __name__ == "__main__":
    main()
