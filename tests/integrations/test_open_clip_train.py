"""open_clip's own trainer (``open_clip_train.main``) with and without clip_fast's switch.

Each case trains a tiny random-init model on CPU for a few steps on a synthetic CSV
dataset (random images written to a temporary folder), once as open_clip ships and once
through ``python -m clip_fast.open_clip_train``'s entry point; the per-step losses and the
final weights must agree to fp32 rounding.  Cases: plain CLIP, CoCa (contrastive plus
caption loss) and distillation (a second tiny model as the teacher, loaded from a file).
"""
from __future__ import annotations

import json
import types

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("open_clip_train.main", reason="open_clip_train needs webdataset, braceexpand, pandas")

import open_clip_train.main as oc_main  # noqa: E402

_REAL_MAIN = oc_main.main

import clip_fast  # noqa: E402
from clip_fast import open_clip_train as launcher  # noqa: E402
from clip_fast.integrations.open_clip import (UnsupportedByClipFast, create_fast_loss,  # noqa: E402
                                              use_fast_losses)

N_SAMPLES, BATCH = 32, 8  # 4 steps of one epoch
LR = 1e-3
_VISION = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16}
_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
CONFIGS = {
    "cf-tiny-clip": {"embed_dim": 16, "vision_cfg": _VISION, "text_cfg": _TEXT},
    "cf-tiny-coca": {
        "embed_dim": 32,  # CoCa's decoder reads the image tokens at the text width
        "vision_cfg": dict(_VISION, attentional_pool=True, attn_pooler_heads=2, output_tokens=True),
        "text_cfg": dict(_TEXT, embed_cls=True, output_tokens=True),
        "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                           "attn_pooler_heads": 2},
        "custom_text": True,
    },
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A CSV of random images with captions, the tiny model configs, and a teacher checkpoint."""
    from PIL import Image

    root = tmp_path_factory.mktemp("open_clip_train")
    gen = torch.Generator().manual_seed(0)
    words = ["red", "blue", "cat", "dog", "tree", "car", "sky", "sea", "big", "small", "old", "new"]
    rows = ["filepath,title"]
    for i in range(N_SAMPLES):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
        path = root / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        caption = " ".join(words[j] for j in torch.randint(0, len(words), (4,), generator=gen).tolist())
        rows.append(f"{path},{caption}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    config_dir = root / "configs"
    config_dir.mkdir()
    for name, cfg in CONFIGS.items():
        (config_dir / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(123)
    teacher = open_clip.create_model("cf-tiny-clip")
    torch.save({"state_dict": teacher.state_dict()}, root / "teacher.pt")
    # open_clip 3.3.0's CoCa leaves text_decoder.text_projection as torch.empty memory
    # (MultimodalTransformer.init_parameters is never called, and fails if called), so two
    # random-init runs start from different weights.  Both CoCa runs start from this file.
    torch.manual_seed(7)
    coca = open_clip.create_model("cf-tiny-coca")
    with torch.no_grad():
        proj = coca.text_decoder.text_projection
        proj.normal_(std=proj.shape[0] ** -0.5)
    torch.save({"state_dict": coca.state_dict()}, root / "coca_init.pt")
    return root


def _argv(root, name, model, extra=()):
    return ["--train-data", str(root / "train.csv"), "--dataset-type", "csv", "--csv-separator", ",",
            "--model", model, "--batch-size", str(BATCH), "--epochs", "1", "--lr", str(LR), "--warmup", "1",
            "--workers", "0", "--precision", "fp32", "--seed", "0", "--log-every-n-steps", "1",
            "--logs", str(root / "logs"), "--name", name, *extra]


def _train(root, name, model, extra, fast, monkeypatch):
    """Run the trainer; return (per-step loss dicts, final state_dict, the loss module's type).

    ``fast``: through the launcher's entry point (``clip_fast.open_clip_train.main``), which
    switches open_clip's ``create_loss`` everywhere before calling open_clip_train's main.
    """
    losses, built = [], []
    real_main = _REAL_MAIN

    def recording_main(argv):
        make = oc_main.create_loss  # open_clip's, or clip_fast's once the launcher switched it

        def create_loss(args):
            loss = make(args)
            built.append(type(loss))
            loss.register_forward_hook(
                lambda mod, inp, out: losses.append({k: float(v.detach()) for k, v in out.items()}))
            return loss

        oc_main.create_loss = create_loss
        try:
            return real_main(argv)
        finally:
            oc_main.create_loss = make

    monkeypatch.setattr(oc_main, "main", recording_main)
    argv = _argv(root, name, model, extra)
    rc = launcher.main(argv) if fast else oc_main.main(argv)
    assert rc in (None, 0), rc
    ckpt = torch.load(root / "logs" / name / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)
    return losses, ckpt["state_dict"], built[0]


CASES = {
    "clip": ("cf-tiny-clip", (), clip_fast.FastClipLoss),
    "coca": ("cf-tiny-coca", ("--pretrained", "COCA_INIT", "--coca-caption-loss-weight", "2.0",
                              "--coca-contrastive-loss-weight", "1.0"),
             clip_fast.FastCoCaLoss),
    "distill": ("cf-tiny-clip", ("--distill-model", "cf-tiny-clip", "--distill-pretrained", "TEACHER"),
                clip_fast.FastDistillClipLoss),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_trainer_same_with_and_without_switch(workdir, kind, monkeypatch):
    """Per-step losses to 1e-5 relative; final weights to fp32 rounding as Adam amplifies it (below)."""
    model, extra, fast_type = CASES[kind]
    files = {"TEACHER": "teacher.pt", "COCA_INIT": "coca_init.pt"}
    extra = tuple(str(workdir / files[a]) if a in files else a for a in extra)
    base_losses, base_sd, base_type = _train(workdir, f"{kind}-open_clip", model, extra, False, monkeypatch)
    fast_losses, fast_sd, got_type = _train(workdir, f"{kind}-clip_fast", model, extra, True, monkeypatch)
    assert got_type is fast_type and base_type.__module__ == "open_clip.loss", (base_type, got_type)
    assert len(base_losses) == len(fast_losses) == N_SAMPLES // BATCH
    worst_loss = 0.0
    for step, (a, b) in enumerate(zip(base_losses, fast_losses)):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for key in a:
            rel = abs(a[key] - b[key]) / max(abs(a[key]), 1e-12)
            worst_loss = max(worst_loss, rel)
            assert rel < 1e-5, f"step {step} {key}: open_clip {a[key]!r}, clip_fast {b[key]!r}"
    # Weights: Adam divides each gradient by its own running size, so an entry whose gradient
    # is a cancellation of larger terms turns fp32 rounding of those terms into a visible
    # share of a step.  Every entry must stay within 5% of one step (lr = 1e-3), and all but
    # 0.1% of them within 1e-6.
    worst_weight, worst_key_bias, loose, total = 0.0, 0.0, 0, 0
    for key, w in base_sd.items():
        if not w.is_floating_point():
            continue
        diff = (w - fast_sd[key]).abs()
        if key.endswith("attn.in_proj_bias"):
            # The attention key bias (the middle third) adds the same amount to every logit
            # of a query's softmax: its exact gradient is 0 and both runs' gradients are
            # rounding noise, which Adam turns into steps of +-lr.  Reported, not compared.
            third = w.shape[0] // 3
            worst_key_bias = max(worst_key_bias, diff[third:2 * third].max().item())
            diff = torch.cat([diff[:third], diff[2 * third:]])
        worst_weight = max(worst_weight, diff.max().item())
        loose += int((diff > 1e-6).sum())
        total += diff.numel()
        assert diff.max().item() <= 0.05 * LR, f"{key}: max |diff| {diff.max():.3g}"
    assert loose <= 1e-3 * total, f"{loose} of {total} weights differ by more than 1e-6"
    print(f"\n{kind}: per-step losses open_clip {base_losses}\n{kind}: per-step losses clip_fast {fast_losses}\n"
          f"{kind}: max relative loss difference {worst_loss:.3g}, max |weight difference| {worst_weight:.3g} "
          f"({loose} of {total} entries above 1e-6; attention key biases, not compared: {worst_key_bias:.3g})")


def test_launcher_entry_point_runs_main_with_switch(monkeypatch):
    """`python -m clip_fast.open_clip_train ARGS` calls open_clip_train's main(ARGS) with the switch on."""
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        seen["create_loss"] = oc_main.create_loss
        seen["open_clip"] = open_clip.create_loss
        return 0

    original = oc_main.create_loss
    monkeypatch.setattr(oc_main, "main", fake_main)
    assert launcher.main(["--model", "x"]) == 0
    assert seen["argv"] == ["--model", "x"]
    assert seen["create_loss"] is not original and seen["create_loss"] is seen["open_clip"]
    assert oc_main.create_loss is original and open_clip.create_loss is original  # restored afterwards


def _args(**kw):
    base = dict(distill=False, model="ViT-B-32", siglip=False, horovod=False, local_loss=False,
                gather_with_grad=False, rank=0, world_size=1, coca_caption_loss_weight=2.0,
                coca_contrastive_loss_weight=1.0, loss_dist_impl=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_switch_patches_every_binding_and_restores():
    """open_clip, open_clip.factory and open_clip_train.main all build the twins, then not."""
    import open_clip.factory

    originals = (open_clip.create_loss, open_clip.factory.create_loss, oc_main.create_loss)
    with use_fast_losses(backend="torch"):
        for fn in (open_clip.create_loss, open_clip.factory.create_loss, oc_main.create_loss):
            assert isinstance(fn(_args()), clip_fast.FastClipLoss)
            assert isinstance(fn(_args(model="coca_ViT-B-32")), clip_fast.FastCoCaLoss)
            assert isinstance(fn(_args(distill=True)), clip_fast.FastDistillClipLoss)
        handle = use_fast_losses()  # switching twice keeps one layer
        handle.restore()
        assert open_clip.create_loss is not originals[0]
    assert (open_clip.create_loss, open_clip.factory.create_loss, oc_main.create_loss) == originals


def test_switch_refuses_horovod():
    with pytest.raises(UnsupportedByClipFast, match="--horovod is not supported"):
        create_fast_loss(_args(horovod=True))


def test_switch_siglip_maps_open_clip_arguments():
    """--siglip builds FastSigLipLoss with open_clip's rank, world_size and loss_dist_impl."""
    loss = create_fast_loss(_args(siglip=True, world_size=2, rank=1, loss_dist_impl="gather"))
    assert isinstance(loss, clip_fast.FastSigLipLoss)
    assert (loss.rank, loss.world_size, loss.dist_impl) == (1, 2, "gather")
    assert create_fast_loss(_args(siglip=True)).dist_impl == "bidir"  # open_clip's default


@pytest.mark.parametrize("kind", [{}, {"model": "coca_ViT-B-32"}, {"distill": True}, {"siglip": True}])
def test_switch_passes_backend_and_chunk_size_to_every_loss(kind):
    """use_fast_losses(backend=..., chunk_size=...) reaches every loss it builds, SigLIP's too
    (it once built FastSigLipLoss without them, silently ignoring the choice)."""
    import open_clip

    with use_fast_losses(backend="torch", chunk_size=7):
        loss = open_clip.create_loss(_args(**kind))
    assert (loss.backend, loss.chunk_size) == ("torch", 7)
