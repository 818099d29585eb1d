"""FastDistillClipLoss and FastCoCaLoss in gloo workers against open_clip's originals.

One spawn of 2 workers runs every case: each rank computes clip_fast's loss and open_clip's
on the same shards, weights them by a per-rank factor (so the gradients that travel
between ranks are told apart) and saves the losses and every input's gradient.  The tests
compare them rank by rank: float64 to 1e-10, float32 to fp32 rounding.
"""
from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.nn.functional as F

from helpers import spawn_ranks

pytest.importorskip("open_clip.loss")
pytestmark = pytest.mark.slow  # one process spawn

WORLD = 2
N_LOCAL = 5
SPAWN_DEADLINE_S = 200
FLAGS = [(False, False), (False, True), (True, False), (True, True)]  # (local_loss, gather_with_grad)
_TRITON = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or torch.cuda.is_available()


def _cases():
    cases = []
    for local, gwg in FLAGS:
        tag = f"local{int(local)}-gwg{int(gwg)}"
        cases.append(dict(name=f"distill-{tag}", kind="distill", local=local, gwg=gwg, dtype="float64",
                          backend="torch", teacher_grad=True))
        cases.append(dict(name=f"coca-{tag}", kind="coca", local=local, gwg=gwg, dtype="float64",
                          backend="torch", teacher_grad=False))
    cases.append(dict(name="distill-frozen-teacher-float32", kind="distill", local=True, gwg=True,
                      dtype="float32", backend="torch", teacher_grad=False))
    if _TRITON:
        cases.append(dict(name="distill-triton-float32", kind="distill", local=False, gwg=True,
                          dtype="float32", backend="triton", teacher_grad=True))
    return cases


def _shards(case, seed, rank):
    gen = torch.Generator().manual_seed(seed)
    n, d, td = N_LOCAL * WORLD, 7, 11
    dtype = torch.float64 if case["dtype"] == "float64" else torch.float32
    img = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64) + 0.5 * img, dim=1)
    timg = F.normalize(torch.randn(n, td, generator=gen, dtype=torch.float64), dim=1)
    ttxt = F.normalize(torch.randn(n, td, generator=gen, dtype=torch.float64) + timg, dim=1)
    logits = torch.randn(n, 6, 9, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 9, (n, 6), generator=gen)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    return [x[rows].to(dtype) for x in (img, txt, timg, ttxt, logits)] + [labels[rows]]


def _grads_of(case, loss_fn, tensors, rank):
    img, txt, timg, ttxt, logits, labels = tensors
    dtype = img.dtype
    leaves = [x.clone().requires_grad_(True) for x in (img, txt)]
    scale = torch.tensor(9.0, dtype=dtype, requires_grad=True)
    weight = 1.0 + 0.5 * rank
    if case["kind"] == "distill":
        t_leaves = [x.clone().requires_grad_(case["teacher_grad"]) for x in (timg, ttxt)]
        tscale = torch.tensor(15.0, dtype=dtype, requires_grad=case["teacher_grad"])
        out = loss_fn(*leaves, scale, *t_leaves, tscale, output_dict=True)
        total = weight * (out["contrastive_loss"] + 0.75 * out["distill_loss"])
        inputs = leaves + [scale] + (t_leaves + [tscale] if case["teacher_grad"] else [])
    else:
        lg = logits.clone().requires_grad_(True)
        out = loss_fn(*leaves, lg, labels, scale, output_dict=True)
        total = weight * (out["contrastive_loss"] + out["caption_loss"])
        inputs = leaves + [scale, lg]
    grads = torch.autograd.grad(total, inputs)
    return [v.detach() for v in out.values()] + list(grads)


def _run_case(case, rank, seed):
    from open_clip.loss import CoCaLoss, DistillClipLoss

    from clip_fast import FastCoCaLoss, FastDistillClipLoss

    kw = dict(local_loss=case["local"], gather_with_grad=case["gwg"], rank=rank, world_size=WORLD)
    tensors = _shards(case, seed, rank)
    out = {}
    try:
        if case["kind"] == "distill":
            ours = FastDistillClipLoss(**kw, backend=case["backend"])
            theirs = DistillClipLoss(**kw)
        else:
            ours = FastCoCaLoss(2.0, 0.5, pad_id=3, **kw, backend=case["backend"])
            theirs = CoCaLoss(2.0, 0.5, pad_id=3, **kw)
        out["ours"] = _grads_of(case, ours, tensors, rank)
        out["theirs"] = _grads_of(case, theirs, tensors, rank)
        # open_clip in float64: the truth the float32 runs are held to.
        out["truth"] = _grads_of(case, theirs, [x.double() if x.is_floating_point() else x for x in tensors], rank)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    return out


def _worker(rank, world_size, store_dir, out_dir, seed):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(store_dir, 'store')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        results = {c["name"]: _run_case(c, rank, seed + i) for i, c in enumerate(_cases())}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("twins_dist"), 4321, SPAWN_DEADLINE_S)


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_twin_matches_open_clip_in_workers(spawned, case):
    """Every rank's losses and gradients equal open_clip's, for each (local_loss, gather_with_grad)."""
    for rank in range(WORLD):
        res = spawned[rank][case["name"]]
        assert "error" not in res, f"rank {rank}: {res['error']}"
        for i, (got, want, truth) in enumerate(zip(res["ours"], res["theirs"], res["truth"])):
            what = f"rank {rank} output {i}"
            if case["dtype"] == "float64":
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")
                continue
            mag = truth.abs().max().item()
            ours = (got.double() - truth).abs().max().item()
            theirs = (want.double() - truth).abs().max().item()
            assert ours <= 4 * theirs + 4e-6 * max(mag, 1e-3), f"{what}: ours {ours:.3g}, open_clip {theirs:.3g}"
