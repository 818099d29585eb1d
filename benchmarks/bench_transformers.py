"""The loss stage of transformers' ``CLIPModel(return_loss=True)`` against the clip_fast switch.

    python benchmarks/bench_transformers.py                           # CPU: N=4096, projection 512
    python benchmarks/bench_transformers.py --n 4096 16384 --reps 3 --reps-large 1

The stage is measured through the real ``CLIPModel.forward``: the model's two feature
getters are replaced on the instance by ones that return the given (N, ``--dim``) projection
outputs (fp32 leaves), so everything after the projections is transformers' own code
(normalisation, logits, loss) or the switch's, and nothing before them runs.  Cases
(forward+backward, the output alive through backward as in a loop that keeps it):

    hf           transformers' own loss (N x N logits, two cross entropies, their gradients)
    fast         the switch's default, logits="keep": transformers' logits still returned
                 (with autograd), the loss fused
    fast_none    logits="none": the output drops the logits, so they are freed when the
                 forward returns

Time: the cases run interleaved in one process (a warm-up round, then ``--reps`` rounds,
each starting one case later), so every case sees the same machine load; median wall and
process CPU time, ``ratio`` / ``cpu_ratio``: the median over rounds of (case / hf in the same
round).  Memory: peak RSS growth of one step over the RSS with the model and inputs alive,
in a fresh process per case; ``mem_ratio`` = case / hf.  A case whose N x N fp32 logits
would not fit ``--max-logit-gib`` is skipped and says so.  Appends to a CSV under
benchmarks/results/ whose rows carry the CPU, versions and date, and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import (RESULTS, environment, interleaved_times, peak_rss_bytes, reset_peak_rss,  # noqa: E402
                        rss_bytes, write_csv)
from ratio_report import ratio_rows, ratio_table  # noqa: E402

CASES = ("hf", "fast", "fast_none")
FIELDS = ["date", "device", "torch", "triton", "python", "transformers", "threads", "backend", "case", "n", "d",
          "reps", "median_ms", "cpu_median_ms", "ratio", "cpu_ratio", "extra_mib", "mem_ratio", "status"]


def make_model(d: int, seed: int = 0):
    """A random-init fp32 ``CLIPModel`` with projection ``d`` whose feature getters return
    their input: ``model(input_ids=txt, pixel_values=img)`` starts from the projections."""
    import transformers
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    tower = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.CLIPConfig(text_config=dict(tower, max_position_embeddings=4),
                                     vision_config=dict(tower, image_size=4, patch_size=4), projection_dim=d)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config)
    model.get_image_features = lambda pixel_values, **_: BaseModelOutputWithPooling(pooler_output=pixel_values)
    model.get_text_features = lambda input_ids, **_: BaseModelOutputWithPooling(pooler_output=input_ids)
    return model


def make_inputs(n: int, d: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """(n, d) fp32 projection outputs, text near its image, as leaves that require grad."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=gen)
    txt = 0.8 * img + 0.6 * torch.randn(n, d, generator=gen)
    return dict(pixel_values=img.requires_grad_(True), input_ids=txt.requires_grad_(True))


def step_fn(case: str, model, inputs: Dict[str, torch.Tensor], backend: str) -> Callable[[], None]:
    """One forward+backward of ``case`` (the switch applied to ``model`` for the fast cases)."""
    from clip_fast.integrations.transformers import apply_fast_loss, remove_fast_loss

    if case not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    remove_fast_loss(model)
    if case != "hf":
        apply_fast_loss(model, logits="none" if case == "fast_none" else "keep", backend=backend)

    def run():
        for x in inputs.values():
            x.grad = None
        model.zero_grad(set_to_none=True)
        out = model(**inputs, return_loss=True)
        out.loss.backward()  # the output (and the logits it holds) stays alive through backward
    return run


def logit_gib(n: int) -> float:
    return n * n * 4 / 2**30


def memory_worker(case, n, d, backend) -> Dict:
    """Run in a fresh process: peak RSS growth of one step over the RSS with model and inputs alive."""
    model, inputs = make_model(d), make_inputs(n, d)
    fn = step_fn(case, model, inputs, backend)
    reset_peak_rss()
    base = rss_bytes()
    fn()
    return {"extra_mib": max(0, peak_rss_bytes() - base) / 2**20}


def memory(case, n, d, backend) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-memory", json.dumps([case, n, d, backend])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "worker failed")
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


def time_cases(n, d, backend, reps) -> Dict[str, Dict]:
    """Interleaved rounds: {case: {wall: [...], cpu: [...]}} (the first round is a warm-up).
    Each case has its own copy of the model, so the switch of one does not reach another."""
    inputs = make_inputs(n, d)
    fns = {c: step_fn(c, make_model(d), inputs, backend) for c in CASES}
    return interleaved_times(fns, reps, rotate=True)


def _rows_for(n, args, env) -> List[Dict]:
    if logit_gib(n) > args.max_logit_gib:
        return [dict(env, case=c, n=n, status=f"skipped: {logit_gib(n):.1f} GiB of logits > --max-logit-gib "
                                               f"{args.max_logit_gib}") for c in CASES]
    reps = args.reps_large if (args.reps_large and n >= args.large) else args.reps
    times = time_cases(n, args.dim, args.backend, reps)
    mems = {c: memory(c, n, args.dim, args.backend) for c in CASES}
    return ratio_rows(env, n, times, mems, "hf", reps=reps)


def run(args) -> List[Dict]:
    import transformers

    env = dict(environment("cpu"), transformers=transformers.__version__, threads=torch.get_num_threads(),
               backend=args.backend, d=args.dim)
    rows = []
    for n in args.n:
        rows += _rows_for(n, args, env)
    return rows


def table(rows) -> str:
    return ratio_table(rows, "hf", reps=True)


def main(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[4096])
    p.add_argument("--dim", type=int, default=512, help="CLIPConfig.projection_dim")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--reps-large", type=int, default=None, help="rounds for N >= --large (a slow shared CPU)")
    p.add_argument("--large", type=int, default=16384)
    p.add_argument("--backend", default="torch", help="clip_fast backend of the switch")
    p.add_argument("--max-logit-gib", type=float, default=2.0)
    p.add_argument("--out", default=None, help="CSV path (default benchmarks/results/transformers_cpu_DATE.csv)")
    p.add_argument("--worker-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_memory:
        print(json.dumps(memory_worker(*json.loads(args.worker_memory))))
        return
    rows = run(args)
    out = args.out or os.path.join(RESULTS, f"transformers_cpu_{rows[0]['date']}.csv")
    write_csv(rows, out, fields=FIELDS)
    print(f"{rows[0]['device']}, torch {rows[0]['torch']}, transformers {rows[0]['transformers']}, "
          f"{rows[0]['threads']} threads, {rows[0]['date']}; CLIPModel loss stage, projection {args.dim}, fp32 "
          "(shared CPU: ratios within one run)\n")
    print(table(rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
