"""Distributed Matryoshka SigLIP in 2 and 3 gloo processes: every rank's loss and gradients
against a float64 materialised reference of open_clip's distributed semantics summed over
the sizes (float64 inputs, torch backend: 1e-9 relative), on unequal shards, odd sizes,
both normalisation settings, group ids and every kind of exchange, and the Triton kernel in
fp32 (2e-5 relative); and the same clear error on every rank when one rank's Matryoshka
options are bad or differ from the others'.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import case_params, case_seed

pytestmark = pytest.mark.slow  # process spawns: tens of seconds on 2 cores

GLOO_TIMEOUT_S = 60
SPAWN_DEADLINE_S = 300
SEED = 2611
D = 13
SCALE, BIAS = 9.0, -3.0
NAMES = ("loss", "d_img", "d_txt", "d_scale", "d_bias")


def _cases(world_size):
    uneven = [5, 8, 3][:world_size]
    base = dict(sizes=uneven, dims=(3, 7, 13), weights=(1.0, 0.5, 2.0), renorm=True, error=None)
    cases = [dict(base, name=f"renorm-{impl}", impl=impl) for impl in ("bidir", "shift", "reduce", "gather")]
    cases += [dict(base, name=f"raw-{impl}", impl=impl, dims=(11, 4), weights=None, renorm=False)
              for impl in ("bidir", "gather")]
    # The Triton kernel (the interpreter on CPU) in fp32: every block of the exchange through it.
    cases += [dict(base, name=f"triton-{impl}", impl=impl, backend="triton") for impl in ("bidir", "gather")]
    cases += [dict(base, name="ids-bidir", impl="bidir", ids=True),
              dict(base, name="mismatch", impl="bidir", error="mismatch"),
              dict(base, name="bad-dims", impl="gather", error="dims")]
    return cases


def _global(case, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(case["sizes"])
    x = torch.randn(n, D, dtype=torch.float64, generator=g)
    t = 0.6 * x + 0.8 * torch.randn(n, D, dtype=torch.float64, generator=g)
    if not case["renorm"]:
        x, t = F.normalize(x, dim=1), F.normalize(t, dim=1)
    ids = torch.randint(0, 4, (n,), generator=g) if case.get("ids") else None
    if case.get("backend") == "triton":  # fp32 inputs: the reference takes their float64 values
        x, t = x.float().double(), t.float().double()
    return x, t, ids


def _shard(case, rank):
    o = sum(case["sizes"][:rank])
    return slice(o, o + case["sizes"][rank])


def _run_case(case, rank, world_size, seed):
    import clip_fast

    x, t, ids = _global(case, seed)
    sl = _shard(case, rank)
    dtype = torch.float32 if case.get("backend") == "triton" else torch.float64
    xi, ti = x[sl].to(dtype).requires_grad_(True), t[sl].to(dtype).requires_grad_(True)
    s = torch.tensor(SCALE, dtype=dtype, requires_grad=True)
    b = torch.tensor(BIAS, dtype=dtype, requires_grad=True)
    dims = case["dims"]
    if case["error"] == "mismatch" and rank == 0:
        dims = None
    if case["error"] == "dims" and rank == 1:
        dims = (3, D + 1)
    try:
        loss_fn = clip_fast.FastSigLipLoss(rank=rank, world_size=world_size, dist_impl=case["impl"],
                                           chunk_size=3, backend=case.get("backend", "auto"),
                                           matryoshka_dims=dims,
                                           matryoshka_weights=case["weights"] if dims == case["dims"] else None,
                                           matryoshka_renormalize=case["renorm"])
        loss = loss_fn(xi, ti, s, b, group_ids=None if ids is None else ids[sl])
        loss.backward()
        return dict(loss=loss.detach(), d_img=xi.grad, d_txt=ti.grad, d_scale=s.grad, d_bias=b.grad)
    except Exception as exc:  # recorded: the test checks every rank raised the same
        return dict(error=f"{type(exc).__name__}: {exc}")


def _reference(case, seed, world_size):
    """Per rank, float64: loss_r = sum_k w_k SigLIP(f_k(img_r), f_k(every text)) / n_r, and
    d img_r, d scale_r, d bias_r of loss_r; d txt_r of the sum of every rank's loss."""
    x, t, ids = _global(case, seed)
    x, t = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
    n = x.shape[0]
    z = (torch.eye(n, dtype=torch.bool) if ids is None else ids[:, None] == ids[None, :]).double() * 2 - 1
    weights = case["weights"] or [1.0] * len(case["dims"])
    losses, leaves = [], []
    for r in range(world_size):
        sl = _shard(case, r)
        s = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
        loss = 0.0
        for d, w in zip(case["dims"], weights):
            xd, td = x[sl, :d], t[:, :d]
            if case["renorm"]:
                xd, td = F.normalize(xd, dim=1), F.normalize(td, dim=1)
            loss = loss + w * -F.logsigmoid(z[sl] * (s * xd @ td.T + b)).sum() / xd.shape[0]
        losses.append(loss)
        leaves.append((s, b))
    total_txt = torch.autograd.grad(sum(losses), t, retain_graph=True)[0]
    out = []
    for r in range(world_size):
        sl = _shard(case, r)
        d_img, d_s, d_b = torch.autograd.grad(losses[r], [x, *leaves[r]], retain_graph=True)
        out.append(dict(loss=losses[r].detach(), d_img=d_img[sl], d_txt=total_txt[sl], d_scale=d_s, d_bias=d_b))
    return out


@pytest.mark.parametrize("world_size,case", case_params(_cases, "ok"))
def test_matches_float64_reference(spawned, world_size, case):
    """Every rank's loss and gradients equal the float64 reference to 1e-9 relative (the
    Triton kernel's fp32: 2e-5)."""
    refs = _reference(case, case_seed(_cases(world_size), case, SEED), world_size)
    tol = 2e-5 if case.get("backend") == "triton" else 1e-9
    for r, res in enumerate(spawned(world_size)):
        got = res[case["name"]]
        assert "error" not in got, got.get("error")
        for what in NAMES:
            rel = float((got[what].double() - refs[r][what]).norm() / refs[r][what].norm())
            assert rel <= tol, f"rank {r} {what}: {rel:.3g}"


@pytest.mark.parametrize("world_size,case", case_params(_cases, "error"))
def test_bad_options_raise_on_every_rank(spawned, world_size, case):
    """Matryoshka options missing on one rank, or out of range on one: every rank raises the
    same error naming them, none hangs."""
    errors = [res[case["name"]].get("error") for res in spawned(world_size)]
    assert all(e is not None for e in errors), errors
    assert len(set(errors)) == 1, errors
    want = "differs across ranks" if case["error"] == "mismatch" else "invalid input on rank(s) [1]"
    assert want in errors[0] and "matryoshka_dims" in errors[0], errors[0]
