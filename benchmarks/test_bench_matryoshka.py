"""pytest-benchmark suite: the Matryoshka loss in one sweep against the per-size loops
(sentence-transformers' MatryoshkaLoss(MNRL) stage and clip_fast's own), forward+backward,
fp32, CPU.

    pytest benchmarks/test_bench_matryoshka.py --benchmark-only
    CLIP_FAST_BENCH_N=8192 pytest benchmarks/test_bench_matryoshka.py --benchmark-only

Shares ``make_inputs``/``step_fn`` with bench_matryoshka.py (which writes the CSV with the
ratios and the memory). Timings only; nothing is asserted about them.
"""
import os
import sys

import pytest

pytest.importorskip("sentence_transformers", reason="the sentence-transformers extra is not installed")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_matryoshka import CASES, make_inputs, step_fn  # noqa: E402

N = int(os.environ.get("CLIP_FAST_BENCH_N", "2048"))
DIMS = (64, 128, 256, 512, 768)


@pytest.mark.parametrize("case", CASES)
def test_matryoshka_forward_backward(benchmark, case):
    run = step_fn(case, make_inputs(N, max(DIMS)), DIMS)
    benchmark.extra_info.update(n=N, dims=list(DIMS), dtype="float32", device="cpu", case=case)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
