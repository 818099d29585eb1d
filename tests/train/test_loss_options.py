"""The trainer's loss options: --label-smoothing, --image-to-text-weight, --positive-groups and
--hard-negatives (clip_fast.clip_loss's options, clip_fast/targets.py).

The first logged loss of a tiny run is checked against a float64 materialised loss on the
initial model's features for the same batch, built independently of the trainer's step.
"""
import csv
import os

import pytest
import torch
import torch.nn.functional as F

import clip_fast
from clip_fast.train import data as D
from clip_fast.train import loop, parse_args, run as main
from train_helpers import make_fake_fashion_mnist, run_args as _args, single_and_torchrun



@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    return make_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")), n_train=640, n_test=100)


def _first_loss(run_dir):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as fh:
        return float(next(csv.DictReader(fh))["loss"])


def reference_loss(img, txt, scale, group_ids=None, neg_txt=None, eps=0.0, lam=0.5):
    """Materialised float64 loss: soft targets uniform over each row's positives (equal ids),
    smoothed over the softmax's classes; hard-negative texts join the image->text columns."""
    img, txt = img.double(), txt.double()
    n = img.shape[0]
    ids = torch.arange(n) if group_ids is None else group_ids
    pos = (ids[:, None] == ids[None, :]).double()
    q = pos / pos.sum(1, keepdim=True)
    cols = txt if neg_txt is None else torch.cat([txt, neg_txt.double()])
    s = float(scale)
    q_row = torch.cat([q, q.new_zeros(n, cols.shape[0] - n)], 1)
    i2t = F.cross_entropy(s * img @ cols.T, q_row, label_smoothing=eps)
    t2i = F.cross_entropy(s * txt @ img.T, q, label_smoothing=eps)
    return lam * i2t + (1 - lam) * t2i


def _first_batch(fake_dir, logs, *extra):
    """The initial model's features for the first step's batch, and the batch's extras."""
    t = loop.setup(_args(fake_dir, logs, "reference", *extra))
    gidx = loop.epoch_permutation(t.args.seed, 0, t.sched.n_train)[:t.args.batch_size]
    images, tokens, extras = loop.load_batch(t, 0, gidx)
    with torch.no_grad():
        img, txt, scale = t.model(images, tokens)
        neg = t.model(None, extras["neg_tokens"])[1] if "neg_tokens" in extras else None
    return gidx, img, txt, scale, neg, extras


@pytest.fixture
def loss_calls(monkeypatch):
    """Every FastClipLoss call's keyword arguments, in order (the loss itself still runs)."""
    calls = []
    forward = clip_fast.FastClipLoss.forward

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(clip_fast.FastClipLoss, "forward", spy)
    return calls


def test_loss_flags_parse():
    args = parse_args([])
    assert (args.label_smoothing, args.image_to_text_weight, args.positive_groups,
            args.hard_negatives) == (0.0, 0.5, "none", 0)
    args = parse_args(["--label-smoothing", "0.1", "--image-to-text-weight", "0.3",
                       "--positive-groups", "class", "--hard-negatives", "16"])
    assert (args.label_smoothing, args.image_to_text_weight, args.positive_groups,
            args.hard_negatives) == (0.1, 0.3, "class", 16)


@pytest.mark.parametrize("argv, message", [
    (["--label-smoothing", "1.0"], "--label-smoothing must be in [0, 1), got 1.0"),
    (["--label-smoothing", "-0.1"], "--label-smoothing must be in [0, 1), got -0.1"),
    (["--image-to-text-weight", "1.5"], "--image-to-text-weight must be in [0, 1], got 1.5"),
    (["--hard-negatives", "-1"], "--hard-negatives must be >= 0, got -1"),
    (["--hard-negatives", "65", "--batch-size", "64"], "--hard-negatives must be <= --batch-size (64)"),
    (["--positive-groups", "caption"], "--positive-groups: invalid choice: 'caption'"),
    (["--train-data", "x.csv", "--positive-groups", "class"],
     "--positive-groups class needs class labels, which only --dataset-type fashion-mnist has; "
     "--dataset-type csv"),
    (["--loss", "siglip", "--label-smoothing", "0.1"],
     "--label-smoothing applies to --loss clip only, got --label-smoothing 0.1 with --loss siglip"),
    (["--loss", "siglip", "--positive-groups", "class"],
     "--positive-groups applies to --loss clip only, got --positive-groups class with --loss siglip"),
    (["--train-data", "shards/", "--hard-negatives", "4"],
     "--hard-negatives 4 needs class labels, which only --dataset-type fashion-mnist has; "
     "--dataset-type webdataset"),
])
def test_bad_loss_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_positive_groups_pass_the_class_ids_to_the_loss(fake_dir, tmp_path, loss_calls):
    extra = ["--epochs", "1", "--batch-size", "64", "--train-limit", "128", "--positive-groups", "class"]
    gidx, img, txt, scale, _, extras = _first_batch(fake_dir, tmp_path, *extra)
    labels = D.load_fashion_mnist(fake_dir, "train")[1][gidx]  # from the label file itself
    loss_calls.clear()
    main(_args(fake_dir, tmp_path, "groups", *extra))
    assert len(loss_calls) == 2  # one call per step
    assert torch.equal(loss_calls[0]["group_ids"], labels)
    assert torch.equal(extras["group_ids"], labels)
    assert len(set(labels.tolist())) < len(labels)  # classes repeat: groups, not pairs
    logged = _first_loss(tmp_path / "groups")
    assert logged == pytest.approx(float(reference_loss(img, txt, scale, labels)), rel=2e-5)
    assert logged != pytest.approx(float(reference_loss(img, txt, scale)), rel=1e-3)


def test_label_smoothing_and_direction_weight_reach_the_loss(fake_dir, tmp_path):
    extra = ["--epochs", "1", "--batch-size", "32", "--train-limit", "32",
             "--label-smoothing", "0.2", "--image-to-text-weight", "0.8"]
    _, img, txt, scale, _, _ = _first_batch(fake_dir, tmp_path, *extra)
    main(_args(fake_dir, tmp_path, "smooth", *extra))
    logged = _first_loss(tmp_path / "smooth")
    assert logged == pytest.approx(float(reference_loss(img, txt, scale, eps=0.2, lam=0.8)), rel=2e-5)
    assert logged != pytest.approx(float(reference_loss(img, txt, scale)), rel=1e-3)


def test_hard_negatives_join_the_image_to_text_softmax(fake_dir, tmp_path, loss_calls):
    k = 8
    extra = ["--epochs", "1", "--batch-size", "32", "--train-limit", "64", "--hard-negatives", str(k)]
    gidx, img, txt, scale, neg, extras = _first_batch(fake_dir, tmp_path, *extra)
    loss_calls.clear()
    main(_args(fake_dir, tmp_path, "negatives", *extra))
    assert [c["negative_text_features"].shape for c in loss_calls] == [(k, img.shape[1])] * 2
    assert extras["neg_tokens"].shape[0] == k
    logged = _first_loss(tmp_path / "negatives")
    assert logged == pytest.approx(float(reference_loss(img, txt, scale, neg_txt=neg)), rel=2e-5)
    assert logged != pytest.approx(float(reference_loss(img, txt, scale)), rel=1e-3)


def test_negative_captions_name_another_class(fake_dir):
    ds = D.FashionMNIST(fake_dir, "train", limit=20)
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(20).repeat(100)
    caps = ds.negative_captions(idx, gen)
    named = [next(c for c, name in enumerate(ds.classnames) if f" {name}." in cap) for cap in caps]
    labels = ds.labels[idx].tolist()
    assert all(c != y for c, y in zip(named, labels))
    for y in set(labels):  # every other class is drawn
        assert {c for c, l in zip(named, labels) if l == y} == set(range(10)) - {y}


def test_gradient_cached_run_with_loss_options_equals_plain_run(fake_dir, tmp_path):
    """Class ids and hard negatives go through gradient caching unchanged (12 negatives in
    micro-batches of 8: two text-only micro-batches, the second partial)."""
    common = ["--epochs", "1", "--batch-size", "48", "--train-limit", "96", "--positive-groups", "class",
              "--hard-negatives", "12", "--label-smoothing", "0.1", "--image-to-text-weight", "0.7"]
    main(_args(fake_dir, tmp_path, "plain", *common))
    main(_args(fake_dir, tmp_path, "cached", *common, "--micro-batch-size", "8"))
    assert _first_loss(tmp_path / "cached") == pytest.approx(_first_loss(tmp_path / "plain"), rel=1e-5)
    a = loop.load_checkpoint(str(tmp_path / "plain" / "checkpoints" / "last.pt"))["model"]
    b = loop.load_checkpoint(str(tmp_path / "cached" / "checkpoints" / "last.pt"))["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_ddp_two_processes_with_loss_options_match_one(fake_dir, tmp_path):
    """torchrun, 2 gloo processes with gradient caching: each rank passes its own samples' class
    ids and the negatives of its own images among the batch's first 40 (32 on rank 0, 8 on
    rank 1); the distributed loss gathers both, so the losses and weights equal a 1-process run's."""
    common = ["--epochs", "1", "--batch-size", "64", "--train-limit", "192", "--positive-groups", "class",
              "--hard-negatives", "40", "--label-smoothing", "0.1", "--image-to-text-weight", "0.7"]
    (one, two), (ca, cb) = single_and_torchrun(fake_dir, tmp_path, common, ("--micro-batch-size", "16"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == ["1", "2", "3"]
    for ra, rb in zip(one, two):
        assert float(rb["loss"]) == pytest.approx(float(ra["loss"]), rel=1e-5), ra["step"]
    a, b = ca["model"], cb["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
