"""Multi-process tests of clip_fast.clip.distributed on CPU (gloo), against a float64 reference.

One spawn per world size (2 and 3) runs every case below in the worker processes and
saves each rank's loss and gradients; the tests then compare them with a single-process
float64 re-statement of open_clip's ``ClipLoss`` (materialised logits, torch autograd,
the gathered copies with or without grad exactly as ``gather_features`` builds them).
For equal shards the workers also run open_clip's own ``ClipLoss`` and the tests check
it against the same reference, so the reference's reading of open_clip is itself tested.

A hung collective fails instead of hanging: gloo has a 30 s timeout and the spawn a
deadline after which the workers are killed.
"""
from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F

from helpers import case_params, case_seed

pytestmark = pytest.mark.slow  # two process spawns, about a minute on 2 cores

SPAWN_DEADLINE_S = 150
GLOO_TIMEOUT_S = 30
FLAGS = [(False, False), (False, True), (True, False), (True, True)]  # (local_loss, gather_with_grad)
_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _case(name, sizes, dim, *, mode="gather", local=True, gwg=True, dtype="float64", scale=7.0,
          bias=None, upstream=None, via="function", chunk_size=None, open_clip=False, error=None,
          reduce_scatter=False, autocast=False):
    return dict(name=name, sizes=sizes, dim=dim, mode=mode, local=local, gwg=gwg, dtype=dtype,
                scale=scale, bias=bias, upstream=upstream, via=via, chunk_size=chunk_size,
                open_clip=open_clip, error=error, reduce_scatter=reduce_scatter, autocast=autocast)


def _cases(world_size):
    uneven = [5, 3] if world_size == 2 else [4, 1, 6]
    even = [4] * world_size
    cases = []
    for local, gwg in FLAGS:
        tag = f"local{int(local)}-gwg{int(gwg)}"
        cases.append(_case(f"gather-uneven-{tag}", uneven, 33, local=local, gwg=gwg,
                           bias=-1.5 if gwg else None))
        cases.append(_case(f"gather-even-openclip-{tag}", even, 16, local=local, gwg=gwg, open_clip=True))
    cases += [
        _case("ring-uneven-bias", uneven, 33, mode="ring", bias=0.75),
        _case("ring-even-openclip", even, 16, mode="ring", open_clip=True),
        _case("ring-float32-chunked", [6] * world_size, 129, mode="ring", dtype="float32", chunk_size=2),
        _case("ring-bfloat16", uneven, 64, mode="ring", dtype="bfloat16", scale=20.0),
        # Confident rows (scale 100): the lse partials merged across ranks differ by tens.
        _case("ring-scale-100", uneven, 33, mode="ring", scale=100.0, bias=-10.0),
        _case("gather-float32-local", uneven, 33, dtype="float32"),
        # float32 features under CPU autocast: the loss runs on their bfloat16 copies.
        _case("ring-autocast-bf16", uneven, 64, mode="ring", dtype="float32", autocast=True),
        # The NCCL branch of the gradient reduce-scatter (padded for uneven shards), run on gloo.
        _case("gather-reduce-scatter-path", uneven, 33, reduce_scatter=True),
        # Upstream gradients that differ per rank (loss * weight_r): exercises the ring's
        # exchange of every rank's upstream gradient and the gather backward's scaling.
        _case("ring-upstream", uneven, 5, mode="ring", upstream=[1.0 + 1.5 * q for q in range(world_size)]),
        _case("gather-upstream-local1-gwg1", uneven, 5, upstream=[2.0 - q for q in range(world_size)]),
        _case("gather-upstream-local0-gwg1", uneven, 5, local=False, gwg=True,
              upstream=[0.5 + q for q in range(world_size)]),
        _case("gather-upstream-local0-gwg0", uneven, 5, local=False, gwg=False,
              upstream=[0.5 + q for q in range(world_size)]),
        # Through the public module (FastClipLoss routes world_size > 1 here).
        _case("module-ring", uneven, 33, mode="ring", via="module", bias=0.5),
        _case("module-gather-local0-gwg1", uneven, 33, local=False, gwg=True, via="module"),
        # Bad shards: every rank must raise the same error, and the group must stay usable.
        _case("error-dim-mismatch", uneven, 8, error="dim"),
        _case("error-3d-on-last-rank", uneven, 8, error="3d"),
        _case("error-rank-args", uneven, 8, error="rank"),
        _case("error-scale-differs", uneven, 8, error="scale"),
        _case("error-ring-flags", uneven, 8, mode="ring", local=False, error="ring_flags"),
        _case("after-errors-still-works", uneven, 8, mode="ring"),
    ]
    return cases


def _global_features(case, seed):
    """The global batch (float64 master copy rounded to the case dtype), split per rank."""
    gen = torch.Generator().manual_seed(seed)
    n, d = sum(case["sizes"]), case["dim"]
    img = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64) + 0.5 * img, dim=1)
    dtype = _DTYPES[case["dtype"]]
    img, txt = img.to(dtype), txt.to(dtype)
    bounds = [0]
    for s in case["sizes"]:
        bounds.append(bounds[-1] + s)
    return ([img[a:b] for a, b in zip(bounds, bounds[1:])], [txt[a:b] for a, b in zip(bounds, bounds[1:])])


# ----------------------------------------------------------------------------------------
# The float64 reference: open_clip's ClipLoss semantics for every rank, in one process.
# ----------------------------------------------------------------------------------------

def reference_distributed(imgs, txts, scale, bias, local_loss, gather_with_grad, upstream=None):
    """Per rank: (loss_r, d img_r, d txt_r, d scale_r, d bias_r) of sum_r upstream_r * loss_r.

    Rank r's gathered copies are ``cat(I_q)`` with grad (gather_with_grad) or detached, with
    rank r's own shard re-inserted when not local_loss -- exactly open_clip's gather_features.
    Feature gradients therefore collect every rank's loss; each rank has its own copy of
    logit_scale / logit_bias, as each DDP replica does before gradient averaging.
    """
    w = len(imgs)
    upstream = upstream or [1.0] * w
    I = [x.detach().double().requires_grad_(True) for x in imgs]
    T = [x.detach().double().requires_grad_(True) for x in txts]
    S = [torch.tensor(float(scale), dtype=torch.float64, requires_grad=True) for _ in range(w)]
    B = [torch.tensor(float(bias or 0.0), dtype=torch.float64, requires_grad=True) for _ in range(w)]
    sizes = [x.shape[0] for x in imgs]
    losses = []
    for r in range(w):
        if gather_with_grad:
            all_i, all_t = torch.cat(I), torch.cat(T)
        else:
            gi, gt = [x.detach() for x in I], [x.detach() for x in T]
            if not local_loss:
                gi[r], gt[r] = I[r], T[r]
            all_i, all_t = torch.cat(gi), torch.cat(gt)
        if local_loss:
            per_img = S[r] * I[r] @ all_t.T
            per_txt = S[r] * T[r] @ all_i.T
            labels = torch.arange(sizes[r]) + sum(sizes[:r])
        else:
            per_img = S[r] * all_i @ all_t.T
            per_txt = per_img.T
            labels = torch.arange(sum(sizes))
        if bias is not None:
            per_img, per_txt = per_img + B[r], per_txt + B[r]
        losses.append((F.cross_entropy(per_img, labels) + F.cross_entropy(per_txt, labels)) / 2)
    total = sum(u * l for u, l in zip(upstream, losses))
    total.backward()
    return [(losses[r].detach(), I[r].grad, T[r].grad, S[r].grad, B[r].grad) for r in range(w)]


# ----------------------------------------------------------------------------------------
# Worker processes.
# ----------------------------------------------------------------------------------------

def _run_case(case, rank, world_size, seed):

    import clip_fast.core.collectives as cf_collectives
    from clip_fast import FastClipLoss
    from clip_fast.clip.distributed import distributed_clip_loss

    imgs, txts = _global_features(case, seed)
    img = imgs[rank].clone().requires_grad_(True)
    txt = txts[rank].clone().requires_grad_(True)
    sdt = torch.float64 if case["dtype"] == "float64" else torch.float32  # open_clip keeps it float32
    scale = torch.tensor(case["scale"], dtype=sdt, requires_grad=True)
    bias = None if case["bias"] is None else torch.tensor(case["bias"], dtype=sdt, requires_grad=True)
    kwargs = dict(rank=rank, world_size=world_size, local_loss=case["local"], gather_with_grad=case["gwg"])
    err = case["error"]
    if err == "dim" and rank == world_size - 1:
        img = torch.randn(img.shape[0], img.shape[1] + 1, dtype=img.dtype)
        txt = torch.randn(img.shape, dtype=img.dtype)
    if err == "3d" and rank == world_size - 1:
        img = img.detach()[None]
    if err == "rank":
        kwargs["rank"] = 0
    if err == "scale" and rank == 1:
        scale = torch.tensor(case["scale"] * 1.5, dtype=sdt)
    out = {}
    cf_collectives.FORCE_REDUCE_SCATTER = case["reduce_scatter"]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case["autocast"]):
            if case["via"] == "module":
                loss_fn = FastClipLoss(**kwargs, backend="torch", distributed=case["mode"],
                                       chunk_size=case["chunk_size"])
                loss = loss_fn(img, txt, scale, bias)
            else:
                loss = distributed_clip_loss(img, txt, scale, bias, **kwargs, mode=case["mode"], backend="torch",
                                             chunk_size=case["chunk_size"])
        if case["autocast"]:
            assert loss.dtype == torch.float32, loss.dtype
        up = 1.0 if case["upstream"] is None else case["upstream"][rank]
        (loss * up).backward()
        out.update(loss=loss.detach(), d_img=img.grad, d_txt=txt.grad, d_scale=scale.grad)
        if bias is not None:
            out["d_bias"] = bias.grad
    except Exception as exc:  # recorded; the test decides whether an error was expected
        out["error"] = f"{type(exc).__name__}: {exc}"
        if err is None:
            out["error"] += "\n" + traceback.format_exc()
    if case["open_clip"]:
        from open_clip.loss import ClipLoss

        oimg = imgs[rank].clone().requires_grad_(True)
        otxt = txts[rank].clone().requires_grad_(True)
        oscale = torch.tensor(case["scale"], dtype=torch.float64, requires_grad=True)
        oloss = ClipLoss(local_loss=case["local"], gather_with_grad=case["gwg"], rank=rank,
                         world_size=world_size)(oimg, otxt, oscale)
        oloss.backward()
        out.update(oc_loss=oloss.detach(), oc_d_img=oimg.grad, oc_d_txt=otxt.grad, oc_d_scale=oscale.grad)
    return out


SEED = 1234


def _case_seed(world_size, case):
    """The seed the workers drew this case's features from."""
    return case_seed(_cases(world_size), case, SEED)



def _params(kind):
    return case_params(_cases, kind)


def _tolerances(dtype):
    return {"float64": (1e-9, 1e-11), "float32": (1e-4, 2e-6), "bfloat16": (2e-2, 2e-3)}[dtype]


def _assert_close(got, want, what, dtype, scale_ref):
    rtol, atol = _tolerances(dtype)
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * max(1.0, scale_ref),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world_size,case", _params("ok"))
def test_matches_float64_reference(spawned, world_size, case):
    """Every rank's loss and gradients equal open_clip's semantics computed in float64."""
    results = [res[case["name"]] for res in spawned(world_size)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} raised: {res['error']}"
    imgs, txts = _global_features(case, _case_seed(world_size, case))
    dt = case["dtype"]
    if case["autocast"]:  # the loss saw the bfloat16-rounded features
        imgs, txts = [x.bfloat16() for x in imgs], [x.bfloat16() for x in txts]
        dt = "bfloat16"
    ref = reference_distributed(imgs, txts, case["scale"], case["bias"], case["local"], case["gwg"],
                                case["upstream"])
    for r, res in enumerate(results):
        loss, d_img, d_txt, d_scale, d_bias = ref[r]
        _assert_close(res["loss"], loss, f"rank {r} loss", dt, case["scale"])
        _assert_close(res["d_img"], d_img, f"rank {r} d_img", dt, d_img.abs().max().item())
        _assert_close(res["d_txt"], d_txt, f"rank {r} d_txt", dt, d_txt.abs().max().item())
        # Both modes: the gradient of this rank's own loss, as open_clip gives it.
        _assert_close(res["d_scale"], d_scale, f"rank {r} d_scale", dt, 1.0)
        if case["bias"] is not None:
            _assert_close(res["d_bias"], d_bias, f"rank {r} d_bias", dt, 1.0)


@pytest.mark.parametrize("world_size,case", [p for p in _params("ok") if p.values[1]["open_clip"]])
def test_reference_agrees_with_open_clip(spawned, world_size, case):
    """open_clip's own ClipLoss, run in the same processes, matches the float64 reference."""
    results = [res[case["name"]] for res in spawned(world_size)]
    imgs, txts = _global_features(case, _case_seed(world_size, case))
    ref = reference_distributed(imgs, txts, case["scale"], None, case["local"], case["gwg"])
    for r, res in enumerate(results):
        for key, want in zip(("oc_loss", "oc_d_img", "oc_d_txt", "oc_d_scale"), ref[r][:4]):
            torch.testing.assert_close(res[key], want, rtol=1e-10, atol=1e-12, msg=lambda m: f"rank {r} {key}: {m}")


_EXPECTED = {
    "dim": "the embedding dimension D differs across ranks",
    "3d": "invalid input on rank(s)",
    "rank": "the rank= arguments were",
    "scale": "(logit_scale, logit_bias) differs across ranks",
    "ring_flags": "mode='ring' computes the local_loss=True, gather_with_grad=True semantics",
}


@pytest.mark.parametrize("world_size,case", _params("error"))
def test_bad_shard_raises_same_error_on_every_rank(spawned, world_size, case):
    """A bad shard on one rank makes every rank raise the same clear error (no hang)."""
    results = [res[case["name"]] for res in spawned(world_size)]
    messages = [res.get("error") for res in results]
    assert all(m is not None for m in messages), f"some ranks did not raise: {messages}"
    assert len(set(messages)) == 1, f"ranks raised different errors: {messages}"
    assert messages[0].startswith("ValueError"), messages[0]
    assert _EXPECTED[case["error"]] in messages[0], messages[0]
    if case["error"] == "3d":
        assert f"rank {world_size - 1}: ValueError: image_features must be 2-D" in messages[0], messages[0]
