"""pytest-benchmark suite: forward+backward of each loss on one shape per device.

    pytest benchmarks/test_bench_loss.py --benchmark-only
    CLIP_FAST_BENCH_N=16384 pytest benchmarks/test_bench_loss.py --benchmark-only

Shares ``make_case``/``build_loss``/``step_fn`` with bench_loss.py. Timings only; the
speed targets are read off these tables and bench_loss.py's CSV, never asserted.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import build_loss, make_case, step_fn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = int(os.environ.get("CLIP_FAST_BENCH_N", "4096" if DEVICE == "cpu" else "65536"))
D = int(os.environ.get("CLIP_FAST_BENCH_D", "512"))
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16
IMPLS = ["clip_fast:auto", "materialised", "open_clip"] + (
    ["clip_fast:triton", "clip_fast:cuda", "materialised_compiled"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward(benchmark, impl):
    try:
        loss_fn = build_loss(impl)
    except Exception as exc:
        pytest.skip(f"{impl} unavailable: {exc}")
    img, txt, scale = make_case(N, D, DTYPE, DEVICE)
    run = step_fn(loss_fn, img, txt, scale, "full")
    try:
        run()
    except RuntimeError as exc:  # e.g. a named backend that cannot run here
        pytest.skip(f"{impl} cannot run: {exc}")

    def once():
        img.grad = txt.grad = scale.grad = None
        run()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(n=N, d=D, dtype=str(DTYPE), device=DEVICE)
    benchmark.pedantic(once, rounds=3 if DEVICE == "cpu" else 20, warmup_rounds=1)
