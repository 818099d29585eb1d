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


# ---- the kernel variants step (benchmarks/bench_variants.py) ----

import bench_variants  # noqa: E402


def test_variants_plan_puts_every_variant_before_the_sweep_and_fits_the_budget():
    """Priced runs: the variants first, then sweep tiles, until the budget is spent."""
    c = bench_variants.Costs(compile_s=18.0, check_s=0.1, calls=25, call_s=0.05)
    per_run = bench_variants.estimate_s(c)
    assert per_run == pytest.approx(18.0 + 0.1 + 25 * 0.05)
    variants = ["default", "share_exp", "fused_bwd", "share_exp+fused_bwd", "tma"]
    kept, dropped = bench_variants.plan(variants, bench_variants.SWEEP_TILES, 120.0, 10.0, c)
    assert [r.variant for r in kept[:5]] == variants and all(r.tile is None for r in kept[:5])
    assert len(kept) == int(110.0 // per_run) and len(kept) * per_run <= 110.0
    assert len(kept) + len(dropped) == 5 + len(bench_variants.SWEEP_TILES)
    # At N = 65,536, D = 512 and ~700 TFLOP/s, one call is priced at 8 N^2 D at half that rate.
    g = bench_variants.costs(False, 65536, 512, 700.0)
    assert g.call_s == pytest.approx(8 * 65536 ** 2 * 512 / 350e12)


def test_variants_plan_puts_siglip_variants_after_clip_and_before_the_sweep():
    c = bench_variants.Costs(compile_s=1.0, check_s=0.0, calls=1, call_s=1.0)
    kept, dropped = bench_variants.plan(["default", "tma"], [(64, 128, 64, 8, 2)], 100.0, 0.0, c,
                                        ["default", "fused_bwd"])
    assert [(r.loss, r.variant, r.tile) for r in kept] == [
        ("clip", "default", None), ("clip", "tma", None), ("siglip", "default", None),
        ("siglip", "fused_bwd", None), ("clip", "default", (64, 128, 64, 8, 2))]
    assert not dropped


def test_largest_n_is_priced_from_the_measured_time_as_n_squared():
    """At N = 65,536: 40 ms a call and a 0.3 s torch check -> 0.46 s; 30 s left allows (30/0.46)^0.5
    = 8.08 x N, rounded down to a multiple of 4096; a memory peak of 10 GiB on 141 GiB caps it at
    0.8 x 14.1 x N; nothing beyond N itself fits in 0.3 s."""
    n = 65536
    big, how = bench_variants.largest_n(40.0, 0.3, n, 30.0, None, None, 4096, 1 << 22)
    assert big == int(n * (30.0 / 0.46) ** 0.5) // 4096 * 4096 and "(N/65536)^2" in how
    assert big * big * 0.46 / n ** 2 <= 30.0 < (big + 4096) ** 2 * 0.46 / n ** 2
    big_mem, _ = bench_variants.largest_n(40.0, 0.3, n, 1e6, 10 * 2**30, 141 * 2**30, 4096, 1 << 22)
    assert big_mem == int(n * 0.8 * 141 / 10) // 4096 * 4096
    assert bench_variants.largest_n(40.0, 0.3, n, 30.0, None, None, 4096, 131072)[0] == 131072
    assert bench_variants.largest_n(40.0, 0.3, n, 0.3, None, None, 4096, 1 << 22)[0] <= n


@pytest.mark.slow
def test_variants_dry_run_writes_a_winner_that_config_reads(tmp_path):
    """The step's Python core on CPU at a tiny size: every CLIP and SigLIP variant checked against
    the torch backend and timed, the largest-N run, a table, and a winner file kernels/config.py
    accepts, with its SigLIP entry."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from clip_fast.kernels import config as kconfig

    rc = bench_variants.main(["--dry-run", "--budget-s", "150", "--out-dir", str(tmp_path),
                              "--n", "24", "--d", "16", "--large-n-s", "20", "--max-n", "64"])
    assert rc == 0
    table = (tmp_path / "variants.md").read_text()
    for name in kconfig.VARIANTS:
        assert f"| clip | {name} | own | 24 | " in table
    for name in kconfig.SIGLIP_VARIANTS:
        assert f"| siglip | {name} | own | 24 | " in table
    assert "| 64 | " in table   # the largest N: 64 (the cap) fits 20 s at a tiny size
    winner = kconfig._read_winner(str(tmp_path / "winner_sm90.json"))
    assert winner["variant"] in kconfig.VARIANTS and winner["dry_run"] is True
    assert winner["siglip"]["variant"] in kconfig.SIGLIP_VARIANTS


def test_predictions_cover_every_variant_from_the_committed_cost_report():
    """benchmarks/predict_variants.py reads the committed sm_90 cost report and predicts each
    variant; its default lands near the earlier static reading of the same kernels (about 40 ms)."""
    import predict_variants
    from clip_fast.kernels import config as kconfig

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks", "results",
                        "kernel_cost_sm90_2026-12-04.txt")
    with open(path) as f:
        preds = {p["variant"]: p for p in predict_variants.predict(predict_variants.parse_report(f.read()))}
    assert set(preds) == set(kconfig.VARIANTS)
    with open(path) as f:
        sig = predict_variants.predict_siglip(predict_variants.parse_report(f.read()))
    assert {p["variant"] for p in sig} == set(kconfig.SIGLIP_VARIANTS)
    assert 30.0 < preds["default"]["total_ms"] < 50.0
    for p in preds.values():
        assert p["total_ms"] == pytest.approx(p["forward_ms"] + p["backward_ms"])


# ---- the shell script's budget (benchmarks/gpu_check.sh), replayed from its own constants ----

import re  # noqa: E402

GPU_CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks", "gpu_check.sh")


def _script_constants() -> dict:
    with open(GPU_CHECK) as f:
        text = f.read()
    consts = {k: int(v) for k, v in re.findall(r"\b([A-Z_]+_S)=(\d+)\b", text)}
    consts["TEST_S"] = int(re.search(r"GPU_CHECK_TEST_S:-(\d+)", text).group(1))
    consts["TOTAL_S"] = int(re.search(r"GPU_CHECK_TOTAL_S:-(\d+)", text).group(1))
    return consts


def _replay(c: dict, took: dict, retry: bool) -> tuple:
    """(end time, {step: its limit}) of gpu_check.sh's steps when each takes ``took[step]`` seconds,
    or its whole limit plus the kill delay when absent -- the script's limit() arithmetic."""
    t, limits = 0, {}

    def run(name, cap, after, kill, least=1):
        nonlocal t
        lim = cap if after is None else max(1, min(cap, c["TOTAL_S"] - t - after))
        if lim < least:
            limits[name] = 0     # the script skips the step
            return
        limits[name] = lim
        t += min(took.get(name, lim + kill), lim + kill)

    run("versions", c["VERSIONS_S"], None, c["KILL_S"])
    run("wheels", c["WHEELS_S"], c["WHEELS_AFTER_S"], c["KILL_S"])
    run("imports", 20, None, c["KILL_S"])
    run("build", c["BUILD_S"], c["BUILD_AFTER_S"], c["KILL_S"])
    if retry:
        run("retry", c["BUILD_RETRY_S"], c["BUILD_RETRY_AFTER_S"], c["KILL_S"])
    run("report", 20, None, c["KILL_S"])
    run("variants", c["VARIANTS_S"], c["VARIANTS_AFTER_S"], c["KILL_S"], least=20)
    run("matryoshka", c["MATRYOSHKA_S"], c["MATRYOSHKA_AFTER_S"], c["KILL_S"], least=10)
    run("tests", c["TEST_S"], c["TESTS_AFTER_S"], 10, least=10)
    bench = c["TOTAL_S"] - t - c["END_RESERVE_S"]
    limits["bench"] = bench if bench >= 20 else 0
    t += limits["bench"] + (c["KILL_S"] if limits["bench"] else 0)
    return t, limits


def test_gpu_check_budget_holds_when_every_step_overruns():
    """Every step to its limit plus its kill delay, the build failing into its retry: the run still
    ends by TOTAL_S - 15 + 5 (the closing lines then fit the 360 s), and every step still runs."""
    c = _script_constants()
    assert c["TOTAL_S"] == 360
    end, limits = _replay(c, {}, retry=True)
    assert end <= c["TOTAL_S"] - c["END_RESERVE_S"] + c["KILL_S"]
    assert limits["variants"] >= 20 and limits["matryoshka"] >= 10 and limits["tests"] >= 30
    assert limits["bench"] >= 35
    # A rerun fits the 15-minute lease after a 2-minute machine start.
    assert 120 + 2 * c["TOTAL_S"] <= 900


def test_gpu_check_budget_with_an_80_s_build():
    """The expected run: quick first steps, an 80 s build; the variants get their whole 140 s."""
    c = _script_constants()
    end, limits = _replay(c, {"versions": 5, "wheels": 5, "imports": 5, "build": 80, "report": 5}, retry=False)
    assert limits["variants"] == c["VARIANTS_S"] == 140
    assert limits["matryoshka"] >= 15 and limits["tests"] >= 30 and limits["bench"] >= 35
    assert end <= c["TOTAL_S"] - c["END_RESERVE_S"] + c["KILL_S"]
    # The variants step's plan: its largest-N share comes out of its own limit.
    assert c["LARGE_N_S"] < c["VARIANTS_S"] - 5
