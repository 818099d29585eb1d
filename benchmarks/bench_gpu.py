"""The benchmark table of benchmarks/gpu_check.sh (one H100/H200, a few minutes).

    python benchmarks/bench_gpu.py                       # on the GPU machine
    python benchmarks/bench_gpu.py --dry-run             # CPU, tiny N: exercises every code path

Rows (one CSV, every row carrying card, python/torch/triton/CUDA/driver versions and date):
* gemm          the bf16 (and fp32) GEMM rate measured in this run (8192^3, do_bench);
* config_sweep  the Triton forward alone at N=65536, D=512, bf16 for a few block configs
                (so the per-architecture table can be corrected from data);
* loss          forward+backward of the symmetric CLIP loss: clip_fast backends
                (triton, cuda when built) against open_clip's ClipLoss (imported),
                torch.compile of the materialised loss, and Inf-CL (``inf_cl``, its
                single-process ``cal_flash_loss``) when installed.  Median time
                (triton.testing.do_bench; a 3-call median for calls longer than 0.5 s),
                extra peak memory over the inputs (torch.cuda.max_memory_allocated), and
                8*N^2*D/time as a fraction of the measured bf16 GEMM rate (8 N^2 D =
                forward tile 2 + backward recompute 2 + two gradient GEMMs 4).

Time budget (``--budget-s``): no case starts after the deadline, and a case is skipped,
with the estimate in its row, when its three timed calls are estimated to overrun the
time left or the per-case cap.  The estimate for an implementation is its measured call
time at the previous size scaled by N^2 * D (the work of every implementation here);
before its first measurement, the work at a conservative fraction of the measured GEMM
rate.  For the cuda backend the estimate is at least the time to stream its backward's
bytes (``cuda_backward_bytes``).
A baseline that is missing, would not fit (its N x N logits estimated before trying),
would exceed the time budget, or fails, gets a row saying so; nothing here raises.
Every row is printed as it is written; SIGINT (``timeout -s INT``) ends the run with the
summary of the rows so far.

With ``--dry-run`` (CPU, tiny sizes, Triton's interpreter) every section and every
implementation's row runs, and the last case is one every implementation must skip; the
torch backend's row stands beside the cuda backend's (unavailable on CPU), and a
Triton kernel the installed Triton's interpreter cannot run gets a ``not_runnable`` row
naming the error.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_loss import (build_loss, inf_cl_head_dim, inf_cl_unsupported, make_case,  # noqa: E402
                        materialised_loss)

FIELDS = ["card", "python", "torch", "triton", "cuda", "driver", "date", "commit", "section", "impl", "dtype", "N", "D",
          "median_ms", "extra_peak_mib", "tflops", "frac_bf16_gemm", "frac_dtype_gemm", "method",
          "status", "note"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# ---- environment -----------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_v = triton.__version__
    except Exception:
        triton_v = "none"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        commit = "unknown"
    return {"card": card, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_v, "cuda": torch.version.cuda or "none", "driver": driver_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": commit}


def driver_version() -> str:
    """The NVIDIA driver's version from nvidia-smi, or 'none'."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0].strip() if out else "none"
    except Exception:
        return "none"


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in s).strip("_")


class Table:
    """Rows written to the CSV as they come, so a timeout keeps what was measured."""

    def __init__(self, env: dict, paths):
        self.env, self.rows = env, []
        self.files = []
        for p in paths:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            f = open(p, "w", newline="")
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            self.files.append((f, w))

    def add(self, **row):
        full = {k: "" for k in FIELDS}
        full.update(self.env)
        full.update({k: ("" if v is None else v) for k, v in row.items()})
        for k in ("median_ms", "extra_peak_mib", "tflops", "frac_bf16_gemm", "frac_dtype_gemm"):
            if isinstance(full[k], float):
                full[k] = f"{full[k]:.4g}"
        self.rows.append(full)
        for f, w in self.files:
            w.writerow(full)
            f.flush()
        shape = f"{full['dtype']} N={full['N']} D={full['D']}" if full["N"] != "" else ""
        figures = [f"{full[k]} {unit}" for k, unit in (("median_ms", "ms"), ("extra_peak_mib", "MiB"),
                                                        ("tflops", "TFLOP/s")) if full[k] != ""]
        print(f"[{full['section']}] {full['impl']} {shape} {full['status']} {', '.join(figures)} "
              f"{full['note']}".rstrip(), flush=True)
        return full

    def close(self):
        for f, _ in self.files:
            f.close()


# ---- timing and memory ----------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device, long_call_s=0.5, memory=False):
    """(median ms, method, extra peak MiB or None).

    The first call is the warm-up (it includes any Triton/inductor compile).  A second
    call gives the estimate: calls shorter than ``long_call_s`` go to
    triton.testing.do_bench (median); longer ones are timed once more and the median of
    the two timed calls is kept (3 calls in all for the big cases).  With ``memory``, the
    extra peak over the memory allocated before the call comes from one warm call (the
    last timed call for long calls, so they are not rerun).
    """
    def timed():
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    def timed_with_peak():
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t = timed()
        return t, (torch.cuda.max_memory_allocated(device) - base) / 2**20

    timed()                      # warm-up / compile
    second = timed()
    if device.type == "cuda" and second < long_call_s:
        import triton.testing
        ms = triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")
        peak = extra_peak_mib(fn, device) if memory else None
        return float(ms), "do_bench", peak
    peak = None
    if memory and device.type == "cuda":
        third, peak = timed_with_peak()
    else:
        third = timed()
    return 1e3 * statistics.median([second, third]), "median of 2 timed calls", peak


def extra_peak_mib(fn, device):
    """Peak memory of one call above what was allocated before it (inputs excluded)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def gemm_tflops(dtype, device, n):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms, method, _ = bench(lambda: torch.mm(a, b), device)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12, method


# ---- the losses -------------------------------------------------------------------------------

_compiled = {}
_compiled_dtypes = set()


def build(impl, dry_run):
    """The loss callable for ``impl``; raises with the reason it cannot be built."""
    if impl in ("triton", "cuda", "torch"):
        return build_loss(f"clip_fast:{impl}")
    if impl == "compiled_materialised":
        if "fn" not in _compiled:
            # dynamic=True: one compile per dtype serves every N and D (compile time is
            # budget); the first call (compile) is excluded from the timing.
            _compiled["fn"] = torch.compile(materialised_loss, dynamic=True,
                                            backend="aot_eager" if dry_run else "inductor")
        return _compiled["fn"]
    return build_loss(impl)  # open_clip, inf_cl: imported, skipped by name when missing


def materialises(impl):
    return impl in ("open_clip", "compiled_materialised")


def step(loss_fn, img, txt, scale):
    def run():
        loss = loss_fn(img, txt, scale)
        torch.autograd.grad(loss, (img, txt, scale))
    return run


# ---- sections ---------------------------------------------------------------------------------

def run_gemm(table, device, dry_run):
    n = 256 if dry_run else 8192
    rates = {}
    for name in ("bf16", "fp32"):
        try:
            rate, method = gemm_tflops(DTYPES[name], device, n)
            rates[name] = rate
            table.add(section="gemm", impl="torch.mm", dtype=name, N=n, D=n, tflops=rate,
                      method=method, status="ok",
                      note=f"fp32 matmul precision={torch.get_float32_matmul_precision()}")
        except Exception as exc:
            table.add(section="gemm", impl="torch.mm", dtype=name, N=n, D=n, status="error",
                      note=f"{type(exc).__name__}: {exc}"[:300])
    return rates


def interpreter_note(exc: BaseException) -> str:
    """The row note for a Triton kernel that the CPU interpreter could not run."""
    try:
        import triton
        version = triton.__version__
    except Exception:
        version = "?"
    first = (str(exc).strip().splitlines() or [""])[0]
    return (f"Triton {version}'s interpreter cannot run this kernel ({type(exc).__name__}: {first})"[:300]
            + "; it runs compiled on a GPU")


def run_config_sweep(table, device, dry_run, deadline):
    from clip_fast.clip.backends import triton_backend
    from clip_fast.kernels import config as kconfig

    if triton_backend.unavailable_reason(device, torch.bfloat16) is not None:
        table.add(section="config_sweep", impl="triton", status="skipped",
                  note=triton_backend.unavailable_reason(device, torch.bfloat16))
        return
    n, d = (128, 32) if dry_run else (65536, 512)
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
    default = kconfig.get_configs(device, torch.bfloat16)
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 3),
              (64, 128, 64, 4, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)]
    if dry_run:
        shapes = [(16, 16, 16, 1, 1), (32, 16, 16, 1, 1)]
    img, txt, _ = make_case(n, d, torch.bfloat16, device)
    img, txt = img.detach(), txt.detach()
    s = torch.tensor(30.0, device=device)
    for shape in shapes:
        if time.time() > deadline:
            table.add(section="config_sweep", impl="triton_forward", dtype="bf16", N=n, D=d,
                      status="skipped", note=f"the sweep's share of the time budget is spent; config {shape}")
            continue
        cfg = kconfig.Configs(forward=kconfig.KernelConfig(*shape), backward=default.backward,
                              col_splits=default.col_splits)
        try:
            with kconfig.override(cfg):
                ms, method, _ = bench(lambda: triton_backend.lse_forward(img, txt, s), device)
            tflops = 2.0 * n * n * d / (ms * 1e-3) / 1e12
            table.add(section="config_sweep", impl="triton_forward", dtype="bf16", N=n, D=d,
                      median_ms=ms, tflops=tflops, method=method, status="ok",
                      note=f"BM,BN,BK,warps,stages={shape} sm_{major}x")
        except Exception as exc:
            if dry_run and kconfig.interpreter_active():
                table.add(section="config_sweep", impl="triton_forward", dtype="bf16", N=n, D=d,
                          status="not_runnable", note=f"{shape}: {interpreter_note(exc)}")
            else:
                table.add(section="config_sweep", impl="triton_forward", dtype="bf16", N=n, D=d,
                          status="error", note=f"{shape}: {type(exc).__name__}: {exc}"[:300])
        if device.type == "cuda":
            torch.cuda.empty_cache()


def cases(dry_run):
    if dry_run:
        # D=256 so that Inf-CL's head_dim path runs too; D=24 is a D Inf-CL cannot take.
        # N=262,144 runs the skip path: every implementation's estimate exceeds the budget.
        return [("bf16", 64, 16), ("bf16", 96, 256), ("fp32", 64, 24), ("bf16", 262144, 512)]
    # Largest last: when the time budget runs out, the big cases are the ones skipped
    # (and say so), not the sweep of D or of dtypes.
    out = [("bf16", n, 512) for n in (8192, 32768, 65536)]
    out += [("bf16", 65536, 768), ("bf16", 65536, 1024)]
    out += [("fp32", n, 512) for n in (8192, 32768, 65536)]
    out += [("bf16", 262144, 512), ("fp32", 262144, 512), ("bf16", 1048576, 512)]
    return out


# Bytes per second the streaming estimate assumes: under the ~4.3 TB/s (read + write) a
# device-to-device copy reaches on an H200, since add_ and the GEMM epilogue do not.
STREAM_BYTES_PER_S = 3.0e12
WORKSPACE_BYTES = 256 * 2**20   # clip_fast's default backward workspace (CLIP_FAST_WORKSPACE_MB)


def cuda_backward_bytes(n: int, d: int, dtype: torch.dtype) -> float:
    """Bytes the cuda backend's backward streams through device memory, beyond its tiles.

    The backward walks S in strips of R = workspace / (N * itemsize) rows (512 rows for
    bf16 at N = 262,144).  Each strip writes its R x N workspace W and reads it twice
    (the two products), and adds its (N x D, fp32) share of d_txt: for 16-bit inputs a
    W.T @ img product into a separate buffer plus ``d_txt.add_`` (4 passes over N x D x 4
    bytes), for fp32 an in-place ``addmm_`` (2 passes).  At N = 262,144, D = 512, bf16:
    512 strips x (2 GiB + 0.75 GiB) ~ 1.4 TiB per call, growing as N^3 at a fixed
    workspace.  The estimate divides it by ``STREAM_BYTES_PER_S``: a floor, since the
    strips' launches and GEMM shapes are not modelled.
    """
    item = torch.empty((), dtype=dtype).element_size()
    rows = max(64, int(WORKSPACE_BYTES / (n * item)) // 64 * 64)
    strips = -(-n // rows)
    passes = 2 if dtype == torch.float32 else 4
    return strips * (passes * n * d * 4 + 3 * min(rows, n) * n * item)


class Estimator:
    """Seconds that the three timed calls of a case will take, per implementation.

    After an implementation has been measured at some (N, D) of a dtype, its call time is
    scaled by N^2 * D to the new case; before that, the case's 8 N^2 D flops at ``eff`` of
    the measured GEMM rate.  The cuda backend is never estimated below the time to stream
    its backward's bytes.
    """

    def __init__(self, rates, dry_run):
        self.rates, self.dry_run = rates, dry_run
        self.measured = {}   # (impl, dtype name) -> (N, D, seconds per call)

    def record(self, impl, dname, n, d, ms):
        self.measured[(impl, dname)] = (n, d, ms * 1e-3)

    def calls_s(self, impl, dname, n, d):
        """(seconds for 3 calls, how it was estimated)."""
        prev = self.measured.get((impl, dname))
        if prev is not None:
            n0, d0, t0 = prev
            per_call = t0 * (n / n0) ** 2 * (d / d0)
            how = f"{t0 * 1e3:.4g} ms/call at N={n0} D={d0} scaled by N^2*D"
        else:
            rate = self.rates.get(dname) or self.rates.get("bf16") or (1.0 if self.dry_run else 50.0)
            eff = 0.35 if impl in ("triton", "cuda") else 0.2
            per_call = 8.0 * n * n * d / (rate * 1e12 * eff)
            how = f"8*N^2*D flops at {eff:.2f} of the {rate:.3g} TFLOP/s GEMM rate"
        if impl == "cuda":
            stream = cuda_backward_bytes(n, d, DTYPES[dname]) / STREAM_BYTES_PER_S
            if stream > per_call:
                per_call = stream
                how = (f"backward streams ~{cuda_backward_bytes(n, d, DTYPES[dname]) / 2**40:.2f} TiB "
                       f"(d_txt products plus add_ per strip) at {STREAM_BYTES_PER_S / 1e12:.0f} TB/s")
        return 3 * per_call, how


def cuda_strip_reason(n: int, d: int, dtype: torch.dtype, max_n: int):
    """Why the cuda backend is not timed at this N (``--cuda-max-n``), or None."""
    if n <= max_n:
        return None
    item = torch.empty((), dtype=dtype).element_size()
    rows = max(64, int(WORKSPACE_BYTES / (n * item)) // 64 * 64)
    return (f"N > --cuda-max-n {max_n}: the cuda backward streams ~"
            f"{cuda_backward_bytes(n, d, dtype) / 2**40:.2f} TiB per call ({-(-n // rows)} strips of "
            f"{rows} rows, each a {n * d * 4 / 2**20:.0f} MiB d_txt product plus add_); its time "
            f"is unmeasured, so it is not risked inside this check's budget")


# Longer than a screen on purpose: each case's decisions (does it fit in memory, is it
# supported, will it finish before the deadline) and its measurement read the same row, estimator
# and deadline in order, top to bottom; split, each piece would take most of this signature.
def run_loss_table(table, device, dry_run, impls, rates, deadline, per_case_cap_s,
                   cuda_max_n=131072):
    """Loss rows (section "loss"): every implementation in ``impls`` at each case of
    ``cases(dry_run)``, forward+backward, or a row saying why it was skipped."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 * 2**30
    est = Estimator(rates, dry_run)
    for dname, n, d in cases(dry_run):
        dtype = DTYPES[dname]
        inputs = None
        for impl in impls:
            row = dict(section="loss", impl=impl, dtype=dname, N=n, D=d)
            left = deadline - time.time()
            if left <= 0:
                table.add(**row, status="skipped", note="time budget spent before this case started")
                continue
            # 1. Would it fit?  The materialising baselines hold several N x N tensors
            #    (logits, their transpose's softmax and gradients): estimate 4 of them.
            if materialises(impl):
                need = 4 * n * n * torch.empty((), dtype=dtype).element_size()
                if need > 0.8 * free:
                    table.add(**row, status="skipped",
                              note=f"needs ~{need / 2**30:.0f} GiB for N x N logits, "
                                   f"{free / 2**30:.0f} GiB free")
                    continue
            if impl == "inf_cl":
                reason = inf_cl_unsupported(n, d, device) if not dry_run or inf_cl_head_dim(d) is None else None
                if reason:
                    table.add(**row, status="skipped", note=reason)
                    continue
            if impl == "cuda" and cuda_strip_reason(n, d, dtype, cuda_max_n):
                table.add(**row, status="skipped", note=cuda_strip_reason(n, d, dtype, cuda_max_n))
                continue
            # 2. Would it finish in the time left?
            calls_s, how = est.calls_s(impl, dname, n, d)
            compile_s = 60.0 if impl == "compiled_materialised" and dname not in _compiled_dtypes else 0.0
            if calls_s > per_case_cap_s or calls_s + compile_s > left:
                table.add(**row, status="skipped",
                          note=f"estimated {calls_s:.0f} s for 3 calls (+{compile_s:.0f} s compile) > budget "
                               f"(cap {per_case_cap_s:.0f} s per case, {left:.0f} s left); estimate: {how}")
                continue
            if impl in ("triton", "cuda", "torch"):
                from clip_fast.clip.backends import available_backends
                reason = available_backends(device, dtype).get(impl)
                if reason:
                    table.add(**row, status="skipped", note=f"unavailable: {reason}"[:300])
                    continue
            try:
                fn = build(impl, dry_run)
            except Exception as exc:
                table.add(**row, status="skipped", note=f"unavailable: {type(exc).__name__}: {exc}"[:300])
                continue
            try:
                if inputs is None:
                    inputs = make_case(n, d, dtype, device)
                run = step(fn, *inputs)
                if impl == "compiled_materialised":
                    _compiled_dtypes.add(dname)
                ms, method, mem = bench(run, device, memory=True)
                est.record(impl, dname, n, d, ms)
                tflops = 8.0 * n * n * d / (ms * 1e-3) / 1e12
                note = ""
                if impl == "inf_cl":
                    note = f"head_dim={inf_cl_head_dim(d)}; computes in fp32"
                if dry_run and impl == "torch":
                    note = "torch backend, standing in for cuda on CPU"
                table.add(**row, median_ms=ms, extra_peak_mib=mem, tflops=tflops,
                          frac_bf16_gemm=tflops / rates["bf16"] if rates.get("bf16") else None,
                          frac_dtype_gemm=tflops / rates[dname] if rates.get(dname) else None,
                          method=method, status="ok", note=note)
            except torch.cuda.OutOfMemoryError as exc:
                table.add(**row, status="oom", note=str(exc).splitlines()[0][:300])
            except Exception as exc:
                if dry_run and impl == "triton":
                    table.add(**row, status="not_runnable", note=interpreter_note(exc))
                elif dry_run and impl == "inf_cl" and device.type != "cuda":
                    table.add(**row, status="not_runnable",
                              note=f"called cal_flash_loss(head_dim={inf_cl_head_dim(d)}); "
                                   f"{inf_cl_unsupported(n, d, device)}")
                else:
                    table.add(**row, status="error",
                              note=f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=2)}"[:500])
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del inputs


def run_siglip_table(table, device, dry_run, deadline):
    """SigLIP rows (section "siglip"): clip_fast's Triton and CUDA backends against open_clip's
    SigLipLoss and the compiled materialised loss, forward+backward, SigLIP's init (scale 10,
    bias -10); TFLOP/s on the 6 N^2 D floor (S once, then the two gradient products)."""
    import bench_siglip

    bench_siglip._DEVICE = device.type
    shapes = [("fp32", 64, 32)] if dry_run else [("bf16", 16384, 512), ("bf16", 65536, 512)]
    impls = ["clip_fast:triton", "clip_fast:cuda", "open_clip", "materialised_compiled", "siglip_kernel"]
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 * 2**30
    for dname, n, d in shapes:
        dtype = DTYPES[dname]
        for impl in impls:
            row = dict(section="siglip", impl=impl, dtype=dname, N=n, D=d)
            if deadline - time.time() < (2 if dry_run else 30):
                table.add(**row, status="skipped", note="time budget for the SigLIP rows spent")
                continue
            if bench_siglip.materialises(impl) and 4 * n * n * dtype.itemsize > 0.8 * free:
                table.add(**row, status="skipped", note=f"needs ~{4 * n * n * dtype.itemsize / 2**30:.0f} GiB")
                continue
            try:
                fn = bench_siglip.build_loss(impl)
            except Exception as exc:
                table.add(**row, status="skipped", note=f"unavailable: {type(exc).__name__}: {exc}"[:300])
                continue
            try:
                run = bench_siglip.step_fn(fn, bench_siglip.make_case(n, d, dtype, device.type), "fwd_bwd")
                ms, method, mem = bench(run, device, memory=True)
                table.add(**row, median_ms=ms, extra_peak_mib=mem,
                          tflops=6.0 * n * n * d / (ms * 1e-3) / 1e12, method=method, status="ok",
                          note="6 N^2 D flops")
            except torch.cuda.OutOfMemoryError as exc:
                table.add(**row, status="oom", note=str(exc).splitlines()[0][:300])
            except Exception as exc:
                status = "not_runnable" if dry_run and impl in ("clip_fast:triton", "clip_fast:cuda") else "error"
                table.add(**row, status=status, note=f"{type(exc).__name__}: {exc}"[:300])
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def summary(table):
    lines = []
    env = table.env
    gem = {r["dtype"]: r["tflops"] for r in table.rows if r["section"] == "gemm" and r["status"] == "ok"}
    lines.append(f"card={env['card']} python={env['python']} torch={env['torch']} triton={env['triton']} "
                 f"cuda={env['cuda']} driver={env['driver']} GEMM TFLOP/s bf16={gem.get('bf16', '?')} "
                 f"fp32={gem.get('fp32', '?')}")
    sweep = [r for r in table.rows if r["section"] == "config_sweep" and r["status"] == "ok"]
    if sweep:
        best = min(sweep, key=lambda r: float(r["median_ms"]))
        lines.append(f"forward config sweep (N={best['N']} D={best['D']} bf16): best {best['note']} "
                     f"{best['median_ms']} ms, {best['tflops']} TFLOP/s")
    lines.append("loss fwd+bwd per case: impl median_ms/extra MiB/fraction of bf16 GEMM rate "
                 "(-status: reason in the CSV note and the log)")
    cases_seen = []
    for r in table.rows:
        key = (r["dtype"], r["N"], r["D"])
        if r["section"] == "loss" and key not in cases_seen:
            cases_seen.append(key)
    for key in cases_seen:
        parts = []
        for r in table.rows:
            if r["section"] != "loss" or (r["dtype"], r["N"], r["D"]) != key:
                continue
            if r["status"] == "ok":
                parts.append(f"{r['impl']} {r['median_ms']}/{r['extra_peak_mib'] or '-'}/{r['frac_bf16_gemm'] or '-'}")
            else:
                parts.append(f"{r['impl']} -{r['status']}")
        lines.append(f"{key[0]} N={key[1]} D={key[2]}: " + " | ".join(parts))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny N: check the script, not the GPU")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new cases after this")
    ap.add_argument("--per-case-cap-s", type=float, default=60.0,
                    help="skip a case whose 3 calls are estimated to take longer")
    ap.add_argument("--cuda-max-n", type=int, default=131072,
                    help="largest N timed for the cuda backend (its backward streams ~N^3 bytes)")
    ap.add_argument("--impls", nargs="+",
                    default=["triton", "cuda", "open_clip", "compiled_materialised", "inf_cl"])
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"))
    if device.type == "cpu" and not args.dry_run:
        print("no CUDA device: use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    start = time.time()
    deadline = start + args.budget_s
    env = environment(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = (f"{'dryrun_' if args.dry_run else ''}gpu_check_{_slug(env['card'])}_torch{_slug(env['torch'])}"
            f"_triton{_slug(env['triton'])}_cuda{_slug(env['cuda'])}_{stamp}.csv")
    paths = [os.path.join(args.out_dir, name)]
    if os.environ.get("OUT") and os.path.realpath(os.environ["OUT"]) != os.path.realpath(args.out_dir):
        paths.append(os.path.join(os.environ["OUT"], name))
    table = Table(env, paths)
    interrupted = False
    try:
        if args.dry_run:
            torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        rates = run_gemm(table, device, args.dry_run)
        try:
            run_config_sweep(table, device, args.dry_run, deadline=start + 0.25 * args.budget_s)
        except Exception as exc:
            table.add(section="config_sweep", status="error", note=f"{type(exc).__name__}: {exc}"[:300])
        try:
            run_siglip_table(table, device, args.dry_run,
                             deadline=min(deadline, time.time() + 0.2 * args.budget_s))
        except Exception as exc:
            table.add(section="siglip", status="error", note=f"{type(exc).__name__}: {exc}"[:300])
        impls = list(args.impls)
        if args.dry_run and "cuda" in impls:   # the extension does not run on CPU: torch stands in
            impls.insert(impls.index("cuda") + 1, "torch")
        run_loss_table(table, device, args.dry_run, impls, rates, deadline,
                       min(args.per_case_cap_s, max(10.0, args.budget_s / 3)), args.cuda_max_n)
    except KeyboardInterrupt:   # timeout -s INT: keep the rows so far and print the summary
        interrupted = True
        print("interrupted (SIGINT): the table holds the rows written so far", flush=True)
    finally:
        table.close()
    print("== summary")
    print(summary(table))
    print(f"CSV: {paths[-1]}; {len(table.rows)} rows; {time.time() - start:.0f} s")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
