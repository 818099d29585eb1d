"""pytest-benchmark suite: transformers' ``CLIPModel(return_loss=True)`` against the clip_fast
switch: the loss stage from the projections on (forward+backward, fp32, projection 512, CPU).

    pytest benchmarks/test_bench_transformers.py --benchmark-only
    CLIP_FAST_BENCH_N=16384 pytest benchmarks/test_bench_transformers.py --benchmark-only

Shares ``make_model``/``make_inputs``/``step_fn`` with bench_transformers.py (which writes the
CSV with the ratios and the memory).  Timings only; nothing is asserted about them.
"""
import os
import sys

import pytest

pytest.importorskip("clip_fast.integrations.transformers", reason="the transformers extra is not installed")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_transformers import CASES, make_inputs, make_model, step_fn  # noqa: E402

N = int(os.environ.get("CLIP_FAST_BENCH_N", "4096"))
DIM = int(os.environ.get("CLIP_FAST_BENCH_D", "512"))


@pytest.mark.parametrize("case", CASES)
def test_clip_model_loss_stage_forward_backward(benchmark, case):
    run = step_fn(case, make_model(DIM), make_inputs(N, DIM), "torch")
    benchmark.extra_info.update(n=N, d=DIM, dtype="float32", device="cpu", case=case)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
