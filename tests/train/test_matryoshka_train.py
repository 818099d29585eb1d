"""The trainer's --matryoshka-dims (and --eval-dims): the flags' checks, the loss it trains
(the first logged loss against a float64 materialised sum of per-size losses on the initial
model's features, built without clip_fast) and the per-size zero-shot columns."""
import pytest
import torch
import torch.nn.functional as F

from clip_fast.train import loop, parse_args, run as main
from train_helpers import make_fake_fashion_mnist, metrics_rows, run_args as _args


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    return make_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")), n_train=96, n_test=40)


def test_flag_parses():
    assert parse_args([]).matryoshka_dims is None
    assert parse_args(["--matryoshka-dims", "16,32,64"]).matryoshka_dims == (16, 32, 64)
    args = parse_args(["--eval-dims", "8,4", "--matryoshka-dims", "4,16"])
    assert (args.eval_dims, loop.eval_dims(args)) == ((8, 4), (4, 8, 16))


@pytest.mark.parametrize("argv, message", [
    (["--matryoshka-dims", "8,x"], "--matryoshka-dims must be comma-separated ints, got '8,x'"),
    (["--matryoshka-dims", "0,8"], "--matryoshka-dims must be distinct sizes in [1, --embed-dim] = [1, 64], got 0,8"),
    (["--matryoshka-dims", "8,65"], "= [1, 64], got 8,65"),
    (["--matryoshka-dims", "8,8"], "got 8,8"),
    (["--loss", "siglip", "--matryoshka-dims", "8"], "--matryoshka-dims applies to --loss clip only"),
    (["--eval-dims", "8,99"], "--eval-dims must be distinct sizes in [1, --embed-dim] = [1, 64], got 8,99"),
])
def test_bad_flag_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def _reference(img, txt, scale, dims):
    """sum over sizes of the symmetric CLIP loss on the L2-normalised prefixes, float64."""
    total = 0.0
    for d in dims:
        x, y = F.normalize(img.double()[:, :d], dim=1), F.normalize(txt.double()[:, :d], dim=1)
        logits = float(scale) * x @ y.T
        labels = torch.arange(x.shape[0])
        total += (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return float(total)


def test_run_trains_the_nested_loss_and_reports_each_size(fake_dir, tmp_path):
    extra = ["--epochs", "1", "--batch-size", "48", "--train-limit", "96", "--matryoshka-dims", "5,16,11"]
    t = loop.setup(_args(fake_dir, tmp_path, "reference", *extra))
    gidx = loop.epoch_permutation(t.args.seed, 0, t.sched.n_train)[:t.args.batch_size]
    images, tokens, _ = loop.load_batch(t, 0, gidx)
    with torch.no_grad():
        img, txt, scale = t.model(images, tokens)
    summary = main(_args(fake_dir, tmp_path, "mrl", *extra))
    rows = metrics_rows(tmp_path / "mrl")
    assert float(rows[0]["loss"]) == pytest.approx(_reference(img, txt, scale, (5, 11, 16)), rel=2e-5)
    last = rows[-1]
    for d in (5, 11, 16):
        assert 0.0 <= float(last[f"zs_top1_d{d}"]) <= 1.0
        assert summary[f"zs_top1_d{d}"] == pytest.approx(float(last[f"zs_top1_d{d}"]), abs=1e-4)
    # The largest size is the whole embedding: its accuracy is the model's own.
    assert summary["zs_top1_d16"] == summary["zs_top1"]
