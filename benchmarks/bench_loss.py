"""Speed and memory of the CLIP loss: clip_fast's backends against the baselines.

One setup function (``make_case``) is shared by the speed and the memory runs.

    python benchmarks/bench_loss.py                      # CPU: N=4096,16384, D=512, fp32
    python benchmarks/bench_loss.py --device cuda --n 8192 65536 --dtype bf16 fp32

Baselines are imported, never copied: open_clip's ``ClipLoss``, the materialised loss
(plain PyTorch, and under ``torch.compile``), and Inf-CL (``inf_cl``) where installed.
A baseline that is missing, or whose N x N logits would not fit, is skipped by name and
the reason is written to the CSV.

Time: median and 20/80% quantiles of forward+backward (or forward / backward alone with
``--mode``): ``triton.testing.do_bench`` on CUDA, a wall-clock loop on CPU.
Memory: extra peak bytes over the inputs: ``torch.cuda.max_memory_allocated`` on CUDA;
on CPU the peak RSS of a fresh worker process minus its RSS once the inputs exist.
Every row carries the device name, versions and date.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_IMPLS = ["clip_fast:auto", "materialised", "open_clip"]
ALL_IMPLS = ["clip_fast:auto", "clip_fast:torch", "clip_fast:triton", "clip_fast:cuda",
             "materialised", "materialised_compiled", "open_clip", "inf_cl"]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --- the losses -----------------------------------------------------------------------------

def materialised_loss(img, txt, scale):
    """The plain N x N loss, as a user without clip_fast would write it."""
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def build_loss(impl: str) -> Callable:
    """The callable for ``impl``; raises ImportError/RuntimeError with the skip reason."""
    if impl.startswith("clip_fast:"):
        import clip_fast

        backend = impl.split(":", 1)[1]
        return clip_fast.FastClipLoss(backend=backend)
    if impl == "materialised":
        return materialised_loss
    if impl == "materialised_compiled":
        return torch.compile(materialised_loss)
    if impl == "open_clip":
        from open_clip.loss import ClipLoss

        return ClipLoss()
    if impl == "inf_cl":
        return inf_cl_loss()
    raise ValueError(f"unknown impl {impl!r}; choose from {ALL_IMPLS}")


INF_CL_HEAD_DIMS = (256, 128, 64, 32, 16)


def inf_cl_head_dim(d: int) -> Optional[int]:
    """The head_dim Inf-CL's kernels can split D into, or None.

    Inf-CL views each (B, D) input as (B, D / head_dim, head_dim) and loads whole
    head_dim-wide blocks without a column mask, so head_dim must be a power of two in
    16..256 that divides D.  256 (its default) is taken when it divides D.
    """
    return next((h for h in INF_CL_HEAD_DIMS if d % h == 0), None)


def inf_cl_unsupported(n: int, d: int, device) -> Optional[str]:
    """Why Inf-CL cannot take this case, or None."""
    if inf_cl_head_dim(d) is None:
        return f"Inf-CL needs D divisible by a power of two in 16..256 (head_dim); D={d}"
    if torch.device(device).type != "cuda":
        return "Inf-CL's launchers assert CUDA tensors (q.is_cuda); it cannot run on CPU"
    return None


def inf_cl_loss() -> Callable:
    """Inf-CL's symmetric CLIP loss on one process.

    ``inf_cl.cal_flash_loss(q, k, labels=None, scale=None, head_dim=256)`` is its
    single-GPU entry: per-row losses ``lse_j(scale q_i . k_j) - scale q_i . k_i``
    (take the mean).  ``cal_inf_loss`` is the distributed (ring) one: it wraps
    ``scale`` in a function whose backward calls ``dist.all_reduce``, which raises
    without a process group.  Inf-CL upcasts both inputs to float32 and computes in
    float32 whatever the input dtype.
    """
    from inf_cl import cal_flash_loss

    def loss(img, txt, scale):
        head_dim = inf_cl_head_dim(img.shape[1])
        if head_dim is None:
            raise ValueError(inf_cl_unsupported(img.shape[0], img.shape[1], img.device))
        i2t = cal_flash_loss(img, txt, scale=scale, head_dim=head_dim).mean()
        t2i = cal_flash_loss(txt, img, scale=scale, head_dim=head_dim).mean()
        return (i2t + t2i) / 2

    return loss


def materialises(impl: str) -> bool:
    return impl in ("materialised", "materialised_compiled", "open_clip")


def make_case(n: int, d: int, dtype: torch.dtype, device: str, seed: int = 0, scale: float = 1 / 0.07):
    """Normalised, paired features that require grad, and logit_scale (default 1/0.07)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    img = torch.randn(n, d, generator=g)
    txt = 0.5 * img + torch.randn(n, d, generator=g)
    img = F.normalize(img, dim=-1).to(device=device, dtype=dtype).requires_grad_(True)
    txt = F.normalize(txt, dim=-1).to(device=device, dtype=dtype).requires_grad_(True)
    scale = torch.tensor(scale, device=device, requires_grad=True)
    return img, txt, scale


def step_fn(loss_fn, img, txt, scale, mode: str) -> Callable[[], None]:
    """A closure running one forward, backward, or forward+backward."""
    if mode == "forward":
        def run():
            with torch.no_grad():
                loss_fn(img, txt, scale)
        return run
    if mode == "backward":
        holder = {}

        def run():
            if "loss" not in holder:
                holder["loss"] = loss_fn(img, txt, scale)
            holder["loss"].backward(retain_graph=True)
        return run

    def run():
        loss_fn(img, txt, scale).backward()
    return run


def materialised_bytes(n: int, dtype: torch.dtype) -> int:
    """What a materialised loss holds at its peak: logits, two log-softmaxes, their grads (~4 N^2)."""
    return 4 * n * n * max(torch.finfo(dtype).bits // 8, 4)


# --- measuring ------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM: this process's peak RSS since start or since the last ``reset_peak_rss``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Linux resets VmHWM to the current RSS when "5" is written to clear_refs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_cpu(fn, reps: int, warmup: int = 1) -> List[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_cuda(impl, n, d, dtype, mode) -> Dict:
    import triton.testing

    loss_fn = build_loss(impl)
    img, txt, scale = make_case(n, d, dtype, "cuda")
    fn = step_fn(loss_fn, img, txt, scale, mode)
    fn()  # compile / autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=[img, txt, scale])
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "extra_mib": extra / 2**20}


def interleaved_times(fns: Dict[str, Callable[[], None]], reps: int, rotate: bool = False
                      ) -> Dict[str, Dict[str, List[float]]]:
    """{case: {"wall": [...], "cpu": [...]}} in seconds over ``reps`` rounds after a warm-up
    round, every case once per round, so a shared machine's load falls on all cases alike.
    ``rotate``: each round starts one case later (no case always runs first)."""
    cases = list(fns)
    times = {c: {"wall": [], "cpu": []} for c in cases}
    for r in range(reps + 1):
        order = cases[r % len(cases):] + cases[:r % len(cases)] if rotate else cases
        for c in order:
            w0, c0 = time.perf_counter(), time.process_time()
            fns[c]()
            if r:
                times[c]["wall"].append(time.perf_counter() - w0)
                times[c]["cpu"].append(time.process_time() - c0)
    return times


def paired_ratio(times: List[float], base: List[float]) -> float:
    """Median over rounds of time / the base case's time in the same round."""
    return statistics.median(a / b for a, b in zip(times, base))


def cpu_memory_worker(impl, n, d, dtype_name, mode) -> Dict:
    """Run in a fresh process: peak RSS growth of one step over the RSS with inputs alive."""
    loss_fn = build_loss(impl)
    img, txt, scale = make_case(n, d, DTYPES[dtype_name], "cpu")
    fn = step_fn(loss_fn, img, txt, scale, mode)
    reset_peak_rss()  # forget the import-time peak
    base = rss_bytes()
    assert peak_rss_bytes() <= base + (16 << 20), "could not reset the peak RSS"
    fn()
    return {"extra_mib": max(0, peak_rss_bytes() - base) / 2**20}


def cpu_memory(impl, n, d, dtype_name, mode, script: str = __file__) -> Dict:
    """One memory case in a fresh process: ``script --worker-memory [impl, n, d, dtype, mode]``
    (this benchmark by default; bench_siglip.py passes itself)."""
    cmd = [sys.executable, os.path.abspath(script), "--worker-memory",
           json.dumps([impl, n, d, dtype_name, mode])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "worker failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the table ------------------------------------------------------------------------------

def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except Exception:
        pass
    return name


def environment(device: str) -> Dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{cpu_name()} ({os.cpu_count()} cores)"
    return {"date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__,
            "triton": triton_version, "cuda": str(torch.version.cuda), "python": platform.python_version()}


FIELDS = ["date", "device", "torch", "triton", "cuda", "python", "impl", "dtype", "n", "d", "mode",
          "median_ms", "p20_ms", "p80_ms", "extra_mib", "status"]


def run_table(args) -> List[Dict]:
    env = environment(args.device)
    rows = []
    free = torch.cuda.mem_get_info()[0] if args.device == "cuda" else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        for d in args.d:
            for n in args.n:
                impls = list(args.impl)
                timing = {}
                for impl in impls:
                    row = dict(env, impl=impl, dtype=dtype_name, n=n, d=d, mode=args.mode, status="ok")
                    if materialises(impl) and materialised_bytes(n, dtype) > 0.8 * free:
                        row["status"] = (f"skipped: N x N logits need ~{materialised_bytes(n, dtype) / 2**30:.0f} GiB, "
                                         f"{free / 2**30:.0f} GiB available")
                    elif impl == "inf_cl" and inf_cl_unsupported(n, d, args.device):
                        row["status"] = f"skipped: {inf_cl_unsupported(n, d, args.device)}"
                    else:
                        try:
                            if args.device == "cuda":
                                row.update(measure_cuda(impl, n, d, dtype, args.mode))
                            else:
                                row.update(cpu_memory(impl, n, d, dtype_name, args.mode))
                                loss_fn = build_loss(impl)
                                timing[impl] = (loss_fn, make_case(n, d, dtype, "cpu"))
                        except torch.cuda.OutOfMemoryError:
                            row["status"] = "skipped: out of memory"
                        except Exception as exc:  # a missing baseline is skipped by name
                            row["status"] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                        if args.device == "cuda":
                            torch.cuda.empty_cache()
                    rows.append(row)
                if args.device == "cpu" and timing:
                    # CPU timings in one process, interleaved, so every impl sees the same machine.
                    samples = {impl: [] for impl in timing}
                    for impl, (fn, case) in timing.items():
                        step_fn(fn, *case, args.mode)()  # warm-up
                    for _ in range(args.reps):
                        for impl, (fn, case) in timing.items():
                            samples[impl] += time_cpu(step_fn(fn, *case, args.mode), reps=1, warmup=0)
                    for row in rows:
                        if row["n"] == n and row["d"] == d and row["dtype"] == dtype_name and row["impl"] in samples:
                            ts = sorted(samples[row["impl"]])
                            row.update(median_ms=statistics.median(ts), p20_ms=ts[int(0.2 * (len(ts) - 1))],
                                       p80_ms=ts[int(round(0.8 * (len(ts) - 1)))])
                    timing.clear()
                for row in rows[-len(impls):]:
                    print(_fmt(row), flush=True)
    return rows


def _fmt(row) -> str:
    if row["status"] != "ok":
        return f"{row['impl']:<24} {row['dtype']} N={row['n']:<8} D={row['d']:<5} {row['status']}"
    return (f"{row['impl']:<24} {row['dtype']} N={row['n']:<8} D={row['d']:<5} "
            f"{row['median_ms']:10.2f} ms  extra {row['extra_mib']:9.1f} MiB")


def write_csv(rows, path, fields=FIELDS, float_format=".4f"):
    """Append ``rows`` to the CSV at ``path`` (header first when the file is new)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({k: (format(v, float_format) if isinstance(v, float) else v) for k, v in row.items()})


def parse_or_serve(p: argparse.ArgumentParser, argv, worker: Callable) -> Optional[argparse.Namespace]:
    """``p``'s arguments, or None in a memory-measuring subprocess (the hidden
    ``--worker-memory JSON`` flag): there ``worker(*JSON)`` runs and its result is printed as JSON."""
    p.add_argument("--worker-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_memory:
        print(json.dumps(worker(*json.loads(args.worker_memory))))
        return None
    return args


def main(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--d", type=int, nargs="+", default=[512])
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--impl", nargs="+", default=DEFAULT_IMPLS, choices=ALL_IMPLS)
    p.add_argument("--mode", default="full", choices=["full", "forward", "backward"])
    p.add_argument("--reps", type=int, default=3, help="CPU timing repetitions per impl")
    p.add_argument("--csv", default=None, help="CSV to append to (default: benchmarks/results/loss_<device>_<date>.csv)")
    args = parse_or_serve(p, argv, cpu_memory_worker)
    if args is None:
        return
    rows = run_table(args)
    path = args.csv or os.path.join(RESULTS, f"loss_{args.device}_{datetime.date.today().isoformat()}.csv")
    write_csv(rows, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
