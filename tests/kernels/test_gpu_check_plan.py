"""The GPU benchmark's planning rules (benchmarks/bench_gpu.py), checked without a GPU."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
import bench_gpu  # noqa: E402
from bench_loss import inf_cl_head_dim, inf_cl_unsupported  # noqa: E402


def test_cuda_backward_bytes_at_262144():
    """512 strips of 512 rows, each 2 GiB of d_txt traffic plus 0.75 GiB of workspace: ~1.4 TiB."""
    n, d = 262144, 512
    assert bench_gpu.cuda_backward_bytes(n, d, torch.bfloat16) == 512 * (4 * n * d * 4 + 3 * 512 * n * 2)
    assert bench_gpu.cuda_strip_reason(n, d, torch.bfloat16, 131072).startswith("N > --cuda-max-n 131072")
    assert bench_gpu.cuda_strip_reason(65536, d, torch.bfloat16, 131072) is None


def test_estimate_scales_the_previous_size_by_n2d():
    est = bench_gpu.Estimator({"bf16": 700.0}, dry_run=False)
    est.record("triton", "bf16", 8192, 512, 10.0)           # 10 ms per call
    secs, how = est.calls_s("triton", "bf16", 32768, 1024)  # 16 x N^2, 2 x D
    assert secs == pytest.approx(3 * 0.010 * 16 * 2)
    assert "scaled by N^2*D" in how
    # Never below the time to stream the cuda backend's bytes.
    secs, how = est.calls_s("cuda", "bf16", 1048576, 512)
    assert secs >= 3 * bench_gpu.cuda_backward_bytes(1048576, 512, torch.bfloat16) / bench_gpu.STREAM_BYTES_PER_S
    assert "TiB" in how


@pytest.mark.parametrize("d, head_dim", [(512, 256), (768, 256), (384, 128), (16, 16), (24, None)])
def test_inf_cl_head_dim(d, head_dim):
    assert inf_cl_head_dim(d) == head_dim
    assert (inf_cl_unsupported(64, d, "cuda") is None) == (head_dim is not None)
