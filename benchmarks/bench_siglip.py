"""Speed and memory of the SigLIP (sigmoid) loss: clip_fast's backends against the baselines.

    python benchmarks/bench_siglip.py                          # CPU: N=2048,4096, D=512, fp32
    python benchmarks/bench_siglip.py --device cuda --n 16384 65536 --dtype bf16

Baselines are imported, never copied: open_clip's ``SigLipLoss`` (with its ``chunk_size``
when the installed open_clip has one), the materialised loss (plain PyTorch, and under
``torch.compile``), and ``siglip_kernel`` where installed.  A baseline that is missing, or
whose N x N logits would not fit, is skipped and the reason written to the CSV.
One setup function (``make_case``) serves the speed and the memory runs; the measuring
helpers (CPU wall-clock loop, peak RSS of a fresh worker, ``do_bench`` and
``max_memory_allocated`` on CUDA, the environment columns) are bench_loss.py's.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import statistics
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_loss  # noqa: E402
from bench_loss import (DTYPES, FIELDS, RESULTS, environment, peak_rss_bytes,  # noqa: E402
                        reset_peak_rss, rss_bytes, time_cpu, write_csv)

DEFAULT_IMPLS = ["clip_fast:auto", "open_clip", "materialised", "materialised_compiled"]
ALL_IMPLS = ["clip_fast:auto", "clip_fast:torch", "clip_fast:triton", "clip_fast:cuda", "open_clip",
             "open_clip_chunked", "materialised", "materialised_compiled", "siglip_kernel"]


def materialised_loss(img, txt, scale, bias):
    """The plain N x N sigmoid loss, as a user without clip_fast would write it."""
    logits = scale * img @ txt.T + bias
    n = img.shape[0]
    z = 2 * torch.eye(n, device=img.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / n


def build_loss(impl: str) -> Callable:
    """The callable for ``impl``; raises ImportError/RuntimeError with the skip reason."""
    if impl.startswith("clip_fast:"):
        import clip_fast

        backend = impl.split(":", 1)[1]
        if backend != "auto":
            import clip_fast.siglip.backends as sb
            reason = sb.unavailable_reason(backend, torch.device(_DEVICE), torch.float32)
            if reason:
                raise RuntimeError(reason)
        return clip_fast.FastSigLipLoss(backend=backend)
    if impl in ("open_clip", "open_clip_chunked"):
        from open_clip.loss import SigLipLoss

        if impl == "open_clip_chunked":
            if "chunk_size" not in inspect.signature(SigLipLoss).parameters:
                import open_clip
                raise RuntimeError(f"open_clip {open_clip.__version__} SigLipLoss has no chunk_size")
            return SigLipLoss(chunk_size=1024)
        return SigLipLoss()
    if impl == "materialised":
        return materialised_loss
    if impl == "materialised_compiled":
        return torch.compile(materialised_loss)
    if impl == "siglip_kernel":
        # siglip_kernel 0.1.2: fused_siglip_loss(img, txt, log_temperature, bias, use_fp8=False,
        # backend="auto") returns open_clip's loss (pair losses summed, divided by N) in the
        # features' dtype.  It takes log(scale), not scale, and both scalars as tensors; it uses
        # the features as given (normalised here), square (N, D), contiguous, on CUDA (importing
        # it queries the GPU).  Its forward computes every gradient, also under no_grad; the
        # backward only scales them.  "auto" sends fp32 to its persistent Triton kernel (SM89+)
        # and bf16/fp16 to cuBLAS GEMMs around a Triton sigmoid-BCE kernel.
        if _DEVICE != "cuda":
            raise RuntimeError(f"siglip_kernel needs a CUDA device (Triton kernels; its import "
                               f"queries the GPU); this run is on {_DEVICE}")
        from siglip_kernel import fused_siglip_loss

        def siglip_kernel_loss(img, txt, scale, bias):
            # scale.log(): the same inputs as clip_fast's, so the gradient reaches scale too.
            return fused_siglip_loss(img.contiguous(), txt.contiguous(), scale.log(), bias)
        return siglip_kernel_loss
    raise ValueError(f"unknown impl {impl!r}")


_DEVICE = "cpu"


def make_case(n: int, d: int, dtype: torch.dtype, device: str, seed: int = 0):
    """bench_loss's paired features with SigLIP's init: scale 10, bias -10."""
    img, txt, scale = bench_loss.make_case(n, d, dtype, device, seed, scale=10.0)
    return img, txt, scale, torch.tensor(-10.0, device=device, requires_grad=True)


def step_fn(loss_fn, case, mode: str) -> Callable[[], None]:
    if mode == "forward":
        def run():
            with torch.no_grad():
                loss_fn(*case)
        return run

    def run():
        loss_fn(*case).backward()
    return run


def materialises(impl: str) -> bool:
    return impl.startswith("materialised") or impl == "open_clip"


def measure_cuda(impl, n, d, dtype, mode) -> Dict:
    import triton.testing

    fn_loss = build_loss(impl)
    case = make_case(n, d, dtype, "cuda")
    fn = step_fn(fn_loss, case, mode)
    fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=list(case))
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "extra_mib": extra / 2**20}


def cpu_memory_worker(impl, n, d, dtype_name, mode) -> Dict:
    """Run in a fresh process: peak RSS growth of one step over the RSS with inputs alive."""
    fn = step_fn(build_loss(impl), make_case(n, d, DTYPES[dtype_name], "cpu"), mode)
    reset_peak_rss()
    base = rss_bytes()
    fn()
    return {"extra_mib": max(0, peak_rss_bytes() - base) / 2**20}


def cpu_memory(impl, n, d, dtype_name, mode) -> Dict:
    return bench_loss.cpu_memory(impl, n, d, dtype_name, mode, script=__file__)


def run_table(args) -> List[Dict]:
    env = environment(args.device)
    rows = []
    for dtype_name in args.dtype:
        for d in args.d:
            for n in args.n:
                samples, fns = {}, {}
                for impl in args.impl:
                    row = dict(env, impl=impl, dtype=dtype_name, n=n, d=d, mode=args.mode, status="ok")
                    try:
                        if args.device == "cuda":
                            row.update(measure_cuda(impl, n, d, DTYPES[dtype_name], args.mode))
                        else:
                            row.update(cpu_memory(impl, n, d, dtype_name, args.mode))
                            fns[impl] = step_fn(build_loss(impl), make_case(n, d, DTYPES[dtype_name], "cpu"),
                                                args.mode)
                    except Exception as exc:  # recorded as the row's status
                        row["status"] = f"skipped: {type(exc).__name__}: {exc}"[:200]
                    rows.append(row)
                if fns:
                    # Interleaved CPU timing: every impl sees the same machine load.
                    for fn in fns.values():
                        fn()
                    samples = {impl: [] for impl in fns}
                    for _ in range(args.reps):
                        for impl, fn in fns.items():
                            samples[impl] += time_cpu(fn, reps=1, warmup=0)
                    for row in rows[-len(args.impl):]:
                        if row["impl"] in samples:
                            ts = sorted(samples[row["impl"]])
                            row.update(median_ms=statistics.median(ts), p20_ms=ts[int(0.2 * (len(ts) - 1))],
                                       p80_ms=ts[int(round(0.8 * (len(ts) - 1)))])
                for row in rows[-len(args.impl):]:
                    print(row["impl"], row["dtype"], row["n"], row["d"], row.get("median_ms"),
                          row.get("extra_mib"), row["status"], flush=True)
    return rows


def main(argv: Optional[List[str]] = None):
    global _DEVICE
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--d", type=int, nargs="+", default=[512])
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--impl", nargs="+", default=DEFAULT_IMPLS, choices=ALL_IMPLS)
    p.add_argument("--mode", default="fwd_bwd", choices=["fwd_bwd", "forward"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--csv", default=None)
    p.add_argument("--worker-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_memory:
        print(json.dumps(cpu_memory_worker(*json.loads(args.worker_memory))))
        return
    _DEVICE = args.device
    rows = run_table(args)
    path = args.csv or os.path.join(RESULTS, f"siglip_{args.device}_{datetime.date.today().isoformat()}.csv")
    write_csv(rows, path, fields=FIELDS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
