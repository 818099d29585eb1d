"""Test inputs and helpers shared by the test folders (clip_fast is imported only inside the
helpers that need it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def features(m, d, dtype=torch.float32, normalise=True, device="cpu"):
    """(m, d) random rows, unit-norm by default, drawn in float64 and cast once."""
    x = torch.randn(m, d, dtype=torch.float64)
    if normalise:
        x = F.normalize(x, dim=1)
    return x.to(device=device, dtype=dtype)


def paired_features(m, k, d, dtype=torch.float32, normalise=True, device="cpu"):
    """(m, d) image rows and (k, d) text rows whose first min(m, k) rows are paired
    (text = 0.6 image + 0.8 noise), so the CLIP loss is not trivially log N."""
    img = torch.randn(m, d, dtype=torch.float64)
    txt = torch.randn(k, d, dtype=torch.float64)
    n = min(m, k)
    txt[:n] = 0.6 * img[:n] + 0.8 * txt[:n]
    if normalise:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    return img.to(device=device, dtype=dtype), txt.to(device=device, dtype=dtype)


def spawn_ranks(worker, world_size, root, seed, deadline_s, extra=()):
    """Run ``worker(rank, world_size, store_dir, out_dir, seed, *extra)`` in ``world_size``
    spawned processes and return each rank's results (``out_dir/rank{r}.pt``, loaded as
    untrusted).

    A hung collective fails the test instead of hanging it: after ``deadline_s`` the
    workers are killed.
    """
    import time

    import pytest
    import torch.multiprocessing as mp

    store_dir, out_dir = root / "store", root / "out"
    store_dir.mkdir()
    out_dir.mkdir()
    ctx = mp.start_processes(worker, args=(world_size, str(store_dir), str(out_dir), seed, *extra),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers (world_size={world_size}) still running after "
                        f"{deadline_s}s: a collective hung")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


def gloo_worker(rank, world_size, store_dir, out_dir, seed, module_name, timeout_s):
    """A spawned rank: joins a gloo group through a file store, runs every case of test module
    ``module_name`` (its ``_cases(world_size)`` and ``_run_case(case, rank, world_size, seed)``)
    and saves the results by case name to ``out_dir/rank{rank}.pt``."""
    import datetime
    import importlib
    import os
    import sys

    import torch.distributed as dist

    module = importlib.import_module(module_name)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(store_dir, 'store')}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        results = {}
        for i, case in enumerate(module._cases(world_size)):
            results[case["name"]] = module._run_case(case, rank, world_size, seed + i)
            dist.barrier()  # every rank done with a case before any starts the next
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown.  After point-to-point exchanges, gloo can abort
    # there ("terminate called without an active exception"), after every collective and the
    # group's destruction have returned (docs/distributed.md counts it); the results are saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawned_cases(tmp_path_factory, module_name, seed, deadline_s, gloo_timeout_s, prefix):
    """``get(world_size)``: the per-rank results of test module ``module_name``'s cases
    (``gloo_worker``), spawned once per world size and kept for the module (conftest's
    ``spawned`` fixture builds it from the module's SEED, SPAWN_DEADLINE_S and GLOO_TIMEOUT_S)."""
    cache = {}

    def get(world_size):
        if world_size not in cache:
            cache[world_size] = spawn_ranks(gloo_worker, world_size,
                                            tmp_path_factory.mktemp(f"{prefix}{world_size}"), seed,
                                            deadline_s, extra=(module_name, gloo_timeout_s))
        return cache[world_size]
    return get


def case_params(cases, kind, world_sizes=(2, 3)):
    """pytest params ``(world_size, case)`` over ``cases(world_size)`` for every world size:
    the cases that expect an error (``kind == "error"``: ``case["error"]`` set) or the others."""
    import pytest

    return [pytest.param(w, case, id=f"w{w}-{case['name']}") for w in world_sizes for case in cases(w)
            if (kind == "error") == (case["error"] is not None)]


def case_seed(cases, case, seed):
    """The seed ``gloo_worker`` gave ``case``: ``seed`` plus its index in ``cases``."""
    return seed + [c["name"] for c in cases].index(case["name"])


# The precision rule (flash-attention's and cut-cross-entropy's): a kernel's error against
# float64 may be at most PRECISION_FACTOR x the materialised PyTorch loss's error in the
# same dtype, with a floor of one unit of the dtype (DTYPE_UNIT) times the reference's norm.
PRECISION_FACTOR = 4.0
DTYPE_UNIT = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8,
              torch.float64: 2.0 ** -53}


def backend_params(with_cuda=True):
    """pytest params for the backends: torch and triton (the interpreter on CPU), and cuda
    marked ``gpu`` (run by benchmarks/gpu_check.sh)."""
    import pytest

    names = ("torch", "triton", "cuda") if with_cuda else ("torch", "triton")
    return [pytest.param(n, marks=[pytest.mark.gpu] if n == "cuda" else [], id=n) for n in names]


def seed_ratio(errors, floors):
    """The precision rule over seeds: the geometric mean over seeds of max(1, error / floor),
    floor = max(materialised error, one unit of the dtype times |reference|).

    One seed's ratio compares two independent roundings of S: where one entry dominates (a
    near tie, a tiny gradient carried by a single logit) it is heavy-tailed both ways, and
    the materialised loss is now and then 10x or 50x luckier than its own typical error.
    The geometric mean over seeds measures the method, not the draw; the ratios below 1
    count as 1 so that a lucky seed cannot hide a bad one.  A systematic error (a factor
    on every seed, or 1e6 on one of 8) still exceeds PRECISION_FACTOR.
    """
    import math

    logs = [math.log(max(1.0, e / f)) if f > 0 else (0.0 if e == 0 else math.inf)
            for e, f in zip(errors, floors)]
    return math.exp(sum(logs) / len(logs))


def aot_check_report(*args):
    """``python -m clip_fast.kernels.aot_check *args`` in a subprocess without TRITON_INTERPRET
    (Triton's real compiler for an explicit target, no GPU): (exit status, stdout + stderr)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "clip_fast.kernels.aot_check", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    return out.returncode, out.stdout + out.stderr


def assert_same_training(got_losses, want_losses, got, want, rel=1e-9):
    """Two training runs agree: every step's loss within ``rel`` (relative), and every floating
    weight tensor of the final state dicts within ``rel`` of its own norm, floored at 1e-4 x the
    norm of all weights: a weight that stays ~0, such as an attention key bias (softmax ignores
    it), has only rounding for a gradient, so its difference is judged against the model's scale.
    Returns the worst relative differences: (step loss, weight tensor)."""
    assert len(got_losses) == len(want_losses)
    for step, (g, w) in enumerate(zip(got_losses, want_losses)):
        assert abs(g - w) <= rel * abs(w), f"step {step}: loss {g!r} vs {w!r}"
    assert got.keys() == want.keys()
    weights = [k for k, w in want.items() if w.is_floating_point()]
    total = torch.cat([want[k].flatten() for k in weights]).norm().item()
    worst = 0.0
    for k in weights:
        err = (got[k] - want[k]).norm().item() / max(want[k].norm().item(), 1e-4 * total)
        assert err <= rel, f"{k}: relative difference {err:.3e}"
        worst = max(worst, err)
    return max(abs(g - w) / abs(w) for g, w in zip(got_losses, want_losses)), worst


class GemmFlops:
    """Counts 2 * m * k * n of every matrix product (mm, addmm) dispatched inside the block:
    the GEMM work of a loss, e.g. to show a nested sweep multiplies each K segment once."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        counter = self
        self.flops = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in (aten.mm.default,):
                    counter.flops += 2 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
                elif func in (aten.addmm.default, aten.addmm_.default):
                    counter.flops += 2 * args[1].shape[0] * args[1].shape[1] * args[2].shape[1]
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
