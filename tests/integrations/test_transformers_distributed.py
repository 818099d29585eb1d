"""The fused ``return_loss`` under ``torch.distributed`` (gloo workers, 2 and 3 ranks).

Every rank holds the same tiny float64 model and its shard (3 pairs) of one global batch.

``distributed="global"``: each rank's loss is compared with ``_oracle``'s float64 loss of its
rows (open_clip's ``local_loss=True, gather_with_grad=True`` for CLIP, open_clip's SigLIP loss
over every rank's texts), and its parameter gradients, averaged over the ranks as DDP does,
with the oracle's gradient of the mean of the ranks' losses: relative 1e-9 (1e-6 for the one
gradient transformers computes in float32, hf_tiny_models.FLOAT32_GRADS).  The oracle runs
the unpatched model on every shard and materialises the loss in plain torch.

``distributed="per_shard"`` (the default): each rank's loss and unaveraged gradients equal
transformers' own loss on its shard (1e-9).
"""
from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F

from helpers import case_seed

pytest.importorskip("transformers", reason="the transformers extra is not installed")

pytestmark = pytest.mark.slow  # process spawns

SPAWN_DEADLINE_S = 600
GLOO_TIMEOUT_S = 60
SEED = 2512
SHARD = 3  # pairs per rank (odd)


def _cases(world_size):
    cases = [dict(name="global-clip-gather", kind="clip", distributed="global", clip_dist_impl="gather"),
             dict(name="global-clip-ring", kind="clip", distributed="global", clip_dist_impl="ring")]
    cases += [dict(name=f"global-{kind}-{impl}", kind=kind, distributed="global", siglip_dist_impl=impl)
              for kind, impl in (("siglip", "bidir"), ("siglip", "gather"), ("siglip2", "shift"))]
    cases += [dict(name=f"shard-{kind}", kind=kind) for kind in ("clip", "siglip", "siglip2")]
    return cases


def _inputs(case, world_size, seed):
    from hf_tiny_models import batch

    return batch(case["kind"], SHARD * world_size, torch.Generator().manual_seed(seed + 100))


def _shard(inputs, rank):
    return {k: v[rank * SHARD:(rank + 1) * SHARD] for k, v in inputs.items()}


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, return_loss=True).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run_case(case, rank, world_size, seed):
    import torch.distributed as dist
    from hf_tiny_models import tiny_model

    from clip_fast.integrations.transformers import apply_fast_loss

    out = {}
    try:
        model = tiny_model(case["kind"], seed=seed)
        inputs = _shard(_inputs(case, world_size, seed), rank)
        out["lib_loss"], out["lib_grads"] = _loss_and_grads(model, inputs)  # transformers' per-shard
        options = {k: v for k, v in case.items() if k not in ("name", "kind")}
        out["loss"], out["grads"] = _loss_and_grads(apply_fast_loss(model, **options), inputs)
        if case.get("distributed") == "global":
            for g in out["grads"].values():  # DDP's averaging
                dist.all_reduce(g)
                g /= world_size
    except Exception as exc:  # recorded; every case here must succeed
        out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    return out



def _oracle(case, world_size, seed):
    """(every rank's loss, gradients of their mean by parameter name), float64, materialised."""
    from hf_tiny_models import tiny_model

    model = tiny_model(case["kind"], seed=seed)
    # transformers' forward (no loss), one shard at a time as the ranks run it: SigLIP 2
    # resizes its position embeddings in float32 per call, so a whole-batch call would round
    # that parameter's gradient differently (4e-8 relative) from the sum of the shards' calls
    inputs = _inputs(case, world_size, seed)
    outs = [model(**_shard(inputs, r)) for r in range(world_size)]
    img, txt = torch.cat([o.image_embeds for o in outs]), torch.cat([o.text_embeds for o in outs])
    logits = model.logit_scale.exp() * img @ txt.T  # rows: images, columns: texts
    if case["kind"] == "clip":
        target = torch.arange(len(img))
        per_row = (F.cross_entropy(logits, target, reduction="none")
                   + F.cross_entropy(logits.T, target, reduction="none")) / 2
    else:
        signs = 2 * torch.eye(len(img), dtype=logits.dtype) - 1
        per_row = -F.logsigmoid(signs * (logits + model.logit_bias)).sum(1)
    losses = [chunk.mean() for chunk in per_row.split(SHARD)]
    named = [(n, p) for n, p in model.named_parameters()]
    grads = torch.autograd.grad(sum(losses) / world_size, [p for _, p in named], allow_unused=True)
    return [loss.detach() for loss in losses], {n: g for (n, _), g in zip(named, grads) if g is not None}


def _results(spawned, world_size, case):
    results = [res[case["name"]] for res in spawned(world_size)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} {case['name']} raised: {res['error']}"
    return results


def _params(select):
    return [pytest.param(w, c, id=f"w{w}-{c['name']}") for w in (2, 3) for c in _cases(w) if select(c)]


@pytest.mark.parametrize("world_size,case", _params(lambda c: c.get("distributed") == "global"))
def test_global_loss_matches_float64_oracle_on_every_rank(spawned, world_size, case):
    """distributed="global": every rank's loss, and the DDP-averaged gradients, as the oracle's."""
    from hf_tiny_models import assert_grads_close

    losses, grads = _oracle(case, world_size, case_seed(_cases(world_size), case, SEED))
    for r, res in enumerate(_results(spawned, world_size, case)):
        rel = ((res["loss"] - losses[r]).abs() / losses[r].abs()).item()
        assert rel <= 1e-9, f"rank {r} loss {res['loss'].item()!r} vs {losses[r].item()!r}"
        assert_grads_close(res["grads"], grads, 1e-9, case["kind"], f"rank {r}")
        # the global loss is not transformers' per-shard one, so this comparison can fail
        assert abs(res["lib_loss"] - losses[r]) > 1e-3 * abs(losses[r])


@pytest.mark.parametrize("world_size,case", _params(lambda c: c.get("distributed") != "global"))
def test_default_is_transformers_per_shard_loss_on_every_rank(spawned, world_size, case):
    """The default under torch.distributed: transformers' own per-shard loss and gradients."""
    from hf_tiny_models import assert_grads_close

    for r, res in enumerate(_results(spawned, world_size, case)):
        rel = ((res["loss"] - res["lib_loss"]).abs() / res["lib_loss"].abs()).item()
        assert rel <= 1e-9, f"rank {r} loss {res['loss'].item()!r} vs {res['lib_loss'].item()!r}"
        assert res["grads"].keys() == res["lib_grads"].keys()
        assert_grads_close(res["grads"], res["lib_grads"], 1e-9, case["kind"], f"rank {r}")
