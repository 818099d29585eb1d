"""The reference trainer with ``--loss siglip``: SigLIP's sigmoid loss and its learned bias.

The loss is checked against the float64 reference (tests/reference.py) on the first batch,
the initialisation against SigLIP's (scale 10, bias -10), and the bias through gradient
caching, checkpoints, resuming and two processes.
"""
import shutil

import pytest
import torch

from clip_fast import FastClipLoss, FastSigLipLoss
from clip_fast.gradcache import grad_cache_step, plain_step
from clip_fast.train import load_checkpoint, loop, run as main
from clip_fast.train.models import CLIP, ModelConfig
from reference import reference_clip_loss, reference_siglip_loss
from train_helpers import make_fake_fashion_mnist, metrics_rows as _rows, run_args as _args, single_and_torchrun

SIGLIP = ["--loss", "siglip"]


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    return make_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")), n_train=640, n_test=100)


def _first_batch(t):
    """The images and tokens of step 0, as the training loop draws them."""
    perm = loop.epoch_permutation(t.args.seed, 0, t.sched.n_train)
    return loop.load_batch(t, 0, perm[: t.args.batch_size])[:2]  # without the loss extras


def test_siglip_first_step_is_the_sigmoid_loss_from_siglip_init(fake_dir, tmp_path):
    common = [*SIGLIP, "--epochs", "1", "--batch-size", "64", "--train-limit", "320",
              "--warmup", "2"]
    t = loop.setup(_args(fake_dir, tmp_path, "probe", *common))
    assert isinstance(t.loss_fn, FastSigLipLoss)
    assert t.model.logit_bias.item() == -10.0
    assert t.model.scale().item() == pytest.approx(10.0, rel=1e-6)

    images, tokens = _first_batch(t)
    with torch.no_grad():
        img, txt, scale, bias = t.model(images, tokens)
    ref_loss, _, _, ref_d_scale, ref_d_bias = reference_siglip_loss(img, txt, scale, bias)
    # The CLIP loss on the same features is far from the sigmoid one: the check tells them apart.
    assert abs(reference_clip_loss(img, txt, scale)[0] - ref_loss) > 1.0

    loss, _ = loop.train_step(t, 0, images, tokens)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert ref_d_bias.abs() > 1e-3
    torch.testing.assert_close(t.model.logit_bias.grad.double(), ref_d_bias, rtol=1e-4, atol=1e-7)
    # logit_scale is log-parameterised: d loss / d log s = s * d loss / d s.
    torch.testing.assert_close(t.model.logit_scale.grad.double(), ref_d_scale * scale.double(),
                               rtol=1e-4, atol=1e-7)
    assert t.model.logit_bias.item() != -10.0  # the optimizer moved it

    # The same run end to end: its first logged loss is that loss; the bias is logged.
    summary = main(_args(fake_dir, tmp_path, "run", *common))
    rows = _rows(tmp_path / "run")
    assert float(rows[0]["loss"]) == pytest.approx(ref_loss.item(), abs=2e-5)
    biases = [float(r["logit_bias"]) for r in rows]
    assert len(set(biases)) > 1 and biases[0] != -10.0
    assert summary["logit_bias"] == pytest.approx(biases[-1], abs=1e-4)
    assert "bias" in (tmp_path / "run" / "log.txt").read_text().splitlines()[-2]


def test_clip_run_has_no_bias(fake_dir, tmp_path):
    t = loop.setup(_args(fake_dir, tmp_path, "clip", "--epochs", "1", "--batch-size", "64"))
    assert isinstance(t.loss_fn, FastClipLoss)
    assert t.model.logit_bias is None and "logit_bias" not in t.model.state_dict()
    assert t.model.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert "init_logit_bias" not in t.model_cfg.to_dict()
    assert len(t.model(*_first_batch(t))) == 3


@pytest.mark.parametrize("bad", [float("nan"), "-10", True])
def test_bad_init_logit_bias_is_refused(bad):
    with pytest.raises(ValueError, match="init_logit_bias must be None or a finite number"):
        CLIP(ModelConfig(init_logit_bias=bad))


def test_gradient_cached_siglip_step_equals_plain_step_float64():
    """The bias's gradient, like the scale's, enters gradient caching once, in full."""
    cfg = ModelConfig(image_size=8, in_channels=1, embed_dim=6, cnn_widths=(4, 8), text_width=8,
                      text_layers=1, text_heads=2, context_length=8, n_buckets=64,
                      init_temperature=0.1, init_logit_bias=-10.0)
    torch.manual_seed(0)
    model = CLIP(cfg).double()
    images = torch.randn(12, 1, 8, 8, dtype=torch.float64)
    tokens = model.tokenizer([f"a photo of item {i % 4} number {i}" for i in range(12)])
    loss_fn = FastSigLipLoss(backend="torch")
    ref_loss = plain_step(model, images, tokens, loss_fn)
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = grad_cache_step(model, images, tokens, loss_fn, 5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert ref["logit_bias"].abs() > 1e-3
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], rtol=1e-9, atol=1e-12, msg=k)


def test_gradient_cached_siglip_run_equals_plain_run(fake_dir, tmp_path):
    common = [*SIGLIP, "--epochs", "1", "--batch-size", "96", "--train-limit", "384"]
    main(_args(fake_dir, tmp_path, "plain", *common))
    main(_args(fake_dir, tmp_path, "cached", *common, "--micro-batch-size", "16"))
    a = load_checkpoint(str(tmp_path / "plain" / "checkpoints" / "last.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "cached" / "checkpoints" / "last.pt"))["model"]
    assert a["logit_bias"].item() != -10.0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_checkpoint_round_trips_the_bias(fake_dir, tmp_path, monkeypatch):
    """Resuming from a mid-run checkpoint ends where the uninterrupted run ends, bias included."""
    common = [*SIGLIP, "--epochs", "2", "--batch-size", "64", "--train-limit", "256",
              "--save-every", "3", "--warmup", "2"]
    save = loop.save_checkpoint
    mid = tmp_path / "mid.pt"

    def save_and_keep_step_3(path, step, *rest):
        save(path, step, *rest)
        if step == 3:
            shutil.copy(path, mid)

    monkeypatch.setattr(loop, "save_checkpoint", save_and_keep_step_3)
    main(_args(fake_dir, tmp_path, "whole", *common))
    monkeypatch.setattr(loop, "save_checkpoint", save)

    ckpt = load_checkpoint(str(mid))
    assert ckpt["step"] == 3 and ckpt["loss"] == "siglip"
    assert ckpt["model_config"]["init_logit_bias"] == -10.0
    mid_bias = ckpt["model"]["logit_bias"].item()
    assert mid_bias != -10.0

    t = loop.setup(_args(fake_dir, tmp_path, "probe", *common, "--resume", str(mid)))
    assert t.start_step == 3 and t.model.logit_bias.item() == mid_bias
    summary = main(_args(fake_dir, tmp_path, "resumed", *common, "--resume", str(mid)))
    assert summary["resumed_from"] == 3
    a = load_checkpoint(str(tmp_path / "whole" / "checkpoints" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "resumed" / "checkpoints" / "last.pt"))
    assert a["step"] == b["step"] == 8
    assert a["model"]["logit_bias"].item() != mid_bias
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_resuming_across_losses_is_refused_naming_the_flag(fake_dir, tmp_path):
    common = ["--epochs", "1", "--batch-size", "64", "--train-limit", "128"]
    main(_args(fake_dir, tmp_path, "c", *common))
    main(_args(fake_dir, tmp_path, "s", *common, *SIGLIP))
    clip_ckpt = tmp_path / "c" / "checkpoints" / "last.pt"
    assert load_checkpoint(str(clip_ckpt))["loss"] == "clip"

    with pytest.raises(SystemExit, match="trained with --loss clip and this run has --loss "
                                         "siglip; resume with --loss clip"):
        main(_args(fake_dir, tmp_path, "c", *common, *SIGLIP, "--resume"))
    with pytest.raises(SystemExit, match="trained with --loss siglip and this run has --loss "
                                         "clip; resume with --loss siglip"):
        main(_args(fake_dir, tmp_path, "s", *common, "--resume"))

    # A checkpoint from before --loss existed (no "loss" entry) is a CLIP checkpoint.
    good = torch.load(clip_ckpt, weights_only=True)
    old = {k: v for k, v in good.items() if k != "loss"}
    torch.save(old, clip_ckpt)
    assert main(_args(fake_dir, tmp_path, "c", *common, "--resume"))["resumed_from"] == 2
    torch.save(old, clip_ckpt)
    with pytest.raises(SystemExit, match="trained with --loss clip and this run has --loss siglip"):
        main(_args(fake_dir, tmp_path, "c", *common, *SIGLIP, "--resume"))

    # Tampered entries: an unknown loss, or a loss that the weights contradict.
    for value, message in ((5, "entry 'loss' must be one of .* .got int."),
                           ("sigmoid", "entry 'loss' must be one of .* .got 'sigmoid'."),
                           ("siglip", "marked --loss siglip but its weights lack a logit_bias")):
        torch.save(dict(good, loss=value), clip_ckpt)
        with pytest.raises(SystemExit, match=message):
            main(_args(fake_dir, tmp_path, "c", *common, *SIGLIP, "--resume"))


def test_ddp_two_processes_match_one_with_siglip(fake_dir, tmp_path):
    """torchrun, 2 gloo processes (open_clip's default dist_impl): the first loss and the final
    weights, bias included, equal a 1-process run's."""
    common = [*SIGLIP, "--epochs", "1", "--batch-size", "64", "--train-limit", "192"]
    (one, two), (a, b) = single_and_torchrun(fake_dir, tmp_path, common)
    assert [r["step"] for r in one] == [r["step"] for r in two] == ["1", "2", "3"]
    assert float(two[0]["loss"]) == pytest.approx(float(one[0]["loss"]), rel=1e-5)
    assert b["world_size"] == 2 and b["loss"] == "siglip"
    assert a["model"]["logit_bias"].item() != -10.0
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=k)
