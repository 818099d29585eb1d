"""pytest-benchmark suite: the loss stage of sentence-transformers' MNRL and cached MNRL
against the fused twins (forward+backward, fp32, D=384, 1 hard-negative column, CPU).

    pytest benchmarks/test_bench_sentence_transformers.py --benchmark-only
    CLIP_FAST_BENCH_N=16384 pytest benchmarks/test_bench_sentence_transformers.py --benchmark-only

Shares ``make_inputs``/``step_fn`` with bench_sentence_transformers.py (which writes the CSV
with the ratios and the memory). Timings only; nothing is asserted about them.
"""
import os
import sys

import pytest

# the integration first: it keeps a checkout's kernels/ from passing for the Hub's package
pytest.importorskip("clip_fast.integrations.sentence_transformers",
                    reason="the sentence-transformers extra is not installed")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sentence_transformers import CASES, make_inputs, step_fn  # noqa: E402

N = int(os.environ.get("CLIP_FAST_BENCH_N", "4096"))
D = int(os.environ.get("CLIP_FAST_BENCH_D", "384"))
MINI_BATCH = 32  # the cached loss's default mini_batch_size


@pytest.mark.parametrize("case", CASES)
def test_loss_stage_forward_backward(benchmark, case):
    run = step_fn(case, make_inputs(N, D), "torch", MINI_BATCH)
    benchmark.extra_info.update(n=N, d=D, negatives=1, dtype="float32", device="cpu", case=case)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
