"""Peak memory per rank of the distributed CLIP loss: ring against gather, on CPU (gloo).

    python benchmarks/bench_distributed_memory.py                       # w=4, N_global=4096,16384, D=256
    python benchmarks/bench_distributed_memory.py --world-size 2 --n-global 2048 8192   # same N_local, w=2

Every variant computes the same loss (open_clip's ``local_loss=True, gather_with_grad=True``):

    clip_fast:ring     text blocks travel around the ring; expected O(N_local * D) per rank
    clip_fast:gather   all_gather of both towers' features; expected O(N_global * D) per rank
    open_clip          open_clip's ClipLoss, materialising the (N_local x N_global) logits

What is measured: one forward+backward step per rank, after a warm-up step on a small
batch (gloo and the allocator set themselves up on the first call).  Each rank resets its peak RSS
(``/proc/self/clear_refs``), takes its RSS with the inputs alive as the baseline, runs the
step and reads VmHWM: ``extra_mib`` is the peak minus the baseline, i.e. every byte the loss
allocated on top of its inputs -- torch tensors, gloo's buffers, everything.  Workers run
with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_=65536``) so freed large blocks go
back to the OS and one step's peak is not hidden in memory a previous step left behind.
RSS counts pages, so the figures are honest to about a page per buffer plus allocator
noise (a few MiB).  The CSV also gives ``model_mib``, the bytes the design predicts.
The time per step is a median over a few steps on a shared CPU: indicative only.

clip_fast runs its torch backend with ``--chunk-size`` rows per strip (default 32): the
strips (chunk x K float32, up to three alive) are the CPU stand-in for the tiles the fused
GPU kernels keep on chip, and with the default budget (16 MiB each) they would hide the
distributed part being compared.  The chunk size is written to the CSV.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import cpu_name, peak_rss_bytes, reset_peak_rss, rss_bytes, write_csv  # noqa: E402  (shared)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IMPLS = ("clip_fast:ring", "clip_fast:gather", "open_clip")
FIELDS = ["date", "device", "torch", "python", "comm", "world_size", "impl", "dtype", "n_global", "n_local",
          "d", "chunk_size", "extra_mib_max", "extra_mib_mean", "model_mib", "median_ms", "status"]


def model_mib(impl: str, n_global: int, n_local: int, d: int, elem: int, chunk: int) -> float:
    """The working set each design predicts (MiB), inputs excluded, gradients included.

    ring:      two text buffers (elem) + two float32 travelling d_txt accumulators (one is
               txt.grad at the end) + d_img + one block's d_img and d_txt:  (2 elem + 20) n D
    gather:    the gathered features kept for backward (2 elem N D), one strip's (N, D)
               float32 gradient at a time (4 N D), d_img, d_txt, the reduce-scattered part (12 n D)
    open_clip: two (n x N) logits with their log-softmax and gradients (~6 n N float32) and
               the gathered features with their gradients, 2 N D (elem + 4)
    clip_fast adds the torch backend's strips: up to 3 x chunk x K float32 (K = N for gather).
    """
    if impl == "clip_fast:ring":
        b = (2 * elem + 20) * n_local * d + 3 * chunk * n_local * 4
    elif impl == "clip_fast:gather":
        b = (2 * elem + 4) * n_global * d + 12 * n_local * d + 3 * chunk * n_global * 4
    else:
        b = 6 * n_local * n_global * 4 + 2 * n_global * d * (elem + 4)
    return b / 2**20


def _make_inputs(rank, n_local, d, dtype, seed):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed + rank)
    img = F.normalize(torch.randn(n_local, d, generator=gen), dim=1).to(dtype).requires_grad_(True)
    txt = F.normalize(torch.randn(n_local, d, generator=gen), dim=1).to(dtype).requires_grad_(True)
    scale = torch.tensor(20.0, requires_grad=True)
    return img, txt, scale


def _build(impl, rank, world_size, chunk):
    if impl == "open_clip":
        from open_clip.loss import ClipLoss

        return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    from clip_fast import FastClipLoss

    return FastClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size,
                        backend="torch", chunk_size=chunk, distributed=impl.split(":", 1)[1])


def _step(loss_fn, img, txt, scale):
    """One forward+backward; the previous step's gradients are freed first."""
    img.grad = txt.grad = scale.grad = None
    loss_fn(img, txt, scale).backward()


def _worker(rank, world_size, store, out_dir, configs, reps, chunk):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=600))
    lines = []
    for impl, n_global, d, dtype_name in configs:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        n_local = n_global // world_size
        loss_fn = _build(impl, rank, world_size, chunk)
        # Warm-up on a small batch: gloo pairs, allocator, lazy imports.
        _step(loss_fn, *_make_inputs(rank, 64, d, dtype, 3))
        inputs = _make_inputs(rank, n_local, d, dtype, 7)
        dist.barrier()
        reset_peak_rss()
        base = rss_bytes()
        _step(loss_fn, *inputs)
        extra = max(0, peak_rss_bytes() - base)
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            _step(loss_fn, *inputs)
            times.append((time.perf_counter() - t0) * 1e3)
        lines.append(f"{impl},{n_global},{d},{dtype_name},{extra},{statistics.median(times) if times else ''}")
        del inputs, loss_fn
    with open(os.path.join(out_dir, f"rank{rank}.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    dist.destroy_process_group()


def environment() -> Dict[str, str]:
    import torch

    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": f"{cpu_name()} ({os.cpu_count()} cores, CPU)", "torch": torch.__version__,
            "python": platform.python_version(), "comm": "gloo"}


def run(args) -> List[Dict]:
    # Before torch starts any worker: glibc reads it at process start.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    import torch.multiprocessing as mp

    configs = [(impl, n, d, dt) for dt in args.dtype for d in args.d for n in args.n_global for impl in args.impl]
    for _, n, _, _ in configs:
        if n % args.world_size:
            raise SystemExit(f"--n-global {n} is not divisible by --world-size {args.world_size}")
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(args.world_size, os.path.join(tmp, "store"), tmp, configs, args.reps,
                                          args.chunk_size),
                           nprocs=args.world_size, join=True, start_method="spawn")
        per_rank = []
        for r in range(args.world_size):
            with open(os.path.join(tmp, f"rank{r}.csv")) as f:
                per_rank.append([line.split(",") for line in f.read().split()])
    env = environment()
    rows = []
    for i, (impl, n, d, dt) in enumerate(configs):
        extras = [int(rank_rows[i][4]) / 2**20 for rank_rows in per_rank]
        times = [float(rank_rows[i][5]) for rank_rows in per_rank if rank_rows[i][5]]
        elem = 2 if dt == "bf16" else 4
        rows.append(dict(env, world_size=args.world_size, impl=impl, dtype=dt, n_global=n,
                         n_local=n // args.world_size, d=d,
                         chunk_size=args.chunk_size if impl.startswith("clip_fast") else "",
                         extra_mib_max=max(extras),
                         extra_mib_mean=sum(extras) / len(extras),
                         model_mib=model_mib(impl, n, n // args.world_size, d, elem, args.chunk_size),
                         median_ms=max(times) if times else "", status="ok"))
        r = rows[-1]
        print(f"{impl:<18} {dt} N_global={n:<7} N_local={n // args.world_size:<6} D={d:<5} "
              f"extra peak RSS/rank {r['extra_mib_max']:8.1f} MiB (model {r['model_mib']:7.1f})  "
              f"{r['median_ms'] if r['median_ms'] == '' else format(r['median_ms'], '9.1f')} ms/step", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--n-global", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--d", type=int, nargs="+", default=[256])
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--reps", type=int, default=1, help="timed steps after the memory step")
    p.add_argument("--chunk-size", type=int, default=32, help="torch-backend rows per strip (clip_fast impls)")
    p.add_argument("--csv", default=None,
                   help="CSV to append to (default: benchmarks/results/distributed_memory_cpu_<date>.csv)")
    args = p.parse_args(argv)
    rows = run(args)
    path = args.csv or os.path.join(RESULTS, f"distributed_memory_cpu_{datetime.date.today().isoformat()}.csv")
    write_csv(rows, path, FIELDS, float_format=".2f")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
