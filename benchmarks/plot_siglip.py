"""Plot a bench_siglip.py CSV: time and extra memory against N, one line per implementation.

    python benchmarks/plot_siglip.py       # results/siglip_cpu_2026-11-30.csv -> results/siglip_cpu_2026-11-30.png
    python benchmarks/plot_siglip.py benchmarks/results/siglip_<device>_<date>.csv [-o out.png] [--dtype fp32 --d 512]

The CSV has bench_loss.py's columns, so the drawing is plot.py's, titled for SigLIP.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot import plot  # noqa: E402

DEFAULT_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           "siglip_cpu_2026-11-30.csv")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("csv", nargs="?", default=DEFAULT_CSV)
    p.add_argument("-o", "--out", default=None, help="default: the CSV's name with .png")
    p.add_argument("--dtype", default=None, help="default: the first row's")
    p.add_argument("--d", type=int, default=None, help="default: the first row's")
    args = p.parse_args()
    out = args.out or os.path.splitext(args.csv)[0] + ".png"
    print(f"wrote {plot(args.csv, out, args.dtype, args.d, loss_name='SigLIP loss (sigmoid)')}")


if __name__ == "__main__":
    main()
