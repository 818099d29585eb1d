"""pytest-benchmark suite: forward+backward of FastClipLoss with each loss-family option.

    pytest benchmarks/test_bench_family.py --benchmark-only
    CLIP_FAST_BENCH_N=16384 pytest benchmarks/test_bench_family.py --benchmark-only

Shares ``case_spec``/``make_family_case``/``step_fn`` with bench_family.py (which writes the
CSV with the ratios to plain). Timings only; nothing is asserted about them.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_family import CASES, case_spec, make_family_case, step_fn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = int(os.environ.get("CLIP_FAST_BENCH_N", "4096" if DEVICE == "cpu" else "65536"))
D = int(os.environ.get("CLIP_FAST_BENCH_D", "512"))
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16
BACKEND = "torch" if DEVICE == "cpu" else "auto"


@pytest.mark.parametrize("case", CASES)
def test_forward_backward(benchmark, case):
    run = step_fn(*make_family_case(case_spec(case), N, D, DTYPE, DEVICE, BACKEND))
    run()

    def once():
        run()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(n=N, d=D, dtype=str(DTYPE), device=DEVICE, backend=BACKEND, case=case)
    benchmark.pedantic(once, rounds=3 if DEVICE == "cpu" else 20, warmup_rounds=1)
