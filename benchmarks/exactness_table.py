"""The row-norm table: d_img's error against float64 at scale 100 as the rows grow.

    TRITON_INTERPRET=1 python benchmarks/exactness_table.py      # CPU (Triton interpreter)
    python benchmarks/exactness_table.py                         # GPU

65 x 17 features, text rows near their image rows, all rows of the given norm, so |S| is
about 100 * norm^2.  Each cell is ||d_img - ref|| / ||ref|| against the float64 loss of the
same dtype-rounded inputs, for each backend that runs here and for PyTorch's materialised
loss in the same dtype.  A cell is "-" where the backend cannot run.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "loss"))

from reference import reference_clip_loss  # noqa: E402
from test_exactness import DEV, _fused, _materialised, row_norm  # noqa: E402

from clip_fast import backends  # noqa: E402


def rel(got, ref):
    return ((got.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", type=float, default=0.5, help="text rows' distance from image rows")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    args = ap.parse_args(argv)
    names = [b for b in backends.BACKENDS]
    print(f"device {DEV}, torch {torch.__version__}, noise {args.noise}: ||d_img - ref|| / ||ref||")
    print("| dtype | row norm | " + " | ".join(names) + " | materialised |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        for norm in (1.0, 10.0, 30.0, 100.0, 1000.0):
            x, t, scale, bias = row_norm(norm, args.noise)
            x, t = x.to(dtype).double(), t.to(dtype).double()
            ref = reference_clip_loss(x, t, scale, bias)[1]
            cells = []
            for name in names:
                if backends.unavailable_reason(name, DEV, dtype) is not None:
                    cells.append("-")
                    continue
                cells.append(f"{rel(_fused(x, t, scale, bias, dtype, name)[1], ref):.1e}")
            cells.append(f"{rel(_materialised(x, t, scale, bias, dtype)[1], ref):.1e}")
            print(f"| {dname} | {norm:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
