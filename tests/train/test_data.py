"""Data loaders of the reference trainer: idx parsing (incl. corrupted files), CSV, tar shards."""
import csv
import gzip
import io
import os
import tarfile

import numpy as np
import pytest
import torch

from clip_fast.train import data as D
from clip_fast.train.models import HashWordTokenizer
from train_helpers import make_fake_fashion_mnist, write_idx


# ------------------------------------------------------------------------------ idx


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, dtype, compress):
    arr = (np.random.default_rng(0).standard_normal((3, 5, 7)) * 50).astype(dtype)
    path = write_idx(str(tmp_path / "x.idx"), arr, compress)
    out = D.read_idx(path)
    assert out.shape == arr.shape and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, arr)


def _good_bytes():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    return bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], ">u4").tobytes() + arr.tobytes()


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"\x01" + b[1:], "magic number"),
    (lambda b: b[:2] + b"\x07" + b[3:], "unknown idx type code"),
    (lambda b: b[:3] + b"\x09" + b[4:], "dimensions"),
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"\x00", "trailing bytes"),
    (lambda b: b[:6], "truncated idx header"),
    (lambda b: b[:2], "header bytes"),
    (lambda b: b[:4] + np.array([0, 3, 4], ">u4").tobytes() + b[16:], "empty dimension"),
    (lambda b: b[:4] + np.array([2**31, 2**31, 4], ">u4").tobytes() + b[16:], "limit"),
])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_corrupted(tmp_path, mutate, message, compress):
    """Every malformed header or payload is a DataError naming the file."""
    path = str(tmp_path / "bad.idx")
    blob = mutate(_good_bytes())
    with (gzip.open if compress else open)(path, "wb") as fh:
        fh.write(blob)
    with pytest.raises(D.DataError, match=message) as info:
        D.read_idx(path)
    assert "bad.idx" in str(info.value)


def test_idx_truncated_gzip(tmp_path):
    full = gzip.compress(_good_bytes())
    path = tmp_path / "cut.idx.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(D.DataError, match="cut.idx.gz"):
        D.read_idx(str(path))


def test_fashion_mnist_from_data_dir(tmp_path):
    make_fake_fashion_mnist(str(tmp_path), n_train=50, n_test=20, compress=False)
    imgs, labels = D.load_fashion_mnist(str(tmp_path), "train")
    assert imgs.shape == (50, 28, 28) and imgs.dtype == torch.uint8
    assert labels.shape == (50,) and labels.dtype == torch.int64
    ds = D.FashionMNIST(str(tmp_path), "test")
    gen = torch.Generator().manual_seed(0)
    x, caps = ds.get(torch.tensor([0, 5, 7]), gen)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    for cap, lab in zip(caps, ds.labels[[0, 5, 7]].tolist()):
        assert D.FASHION_MNIST_CAPTION_NAMES[lab] in cap
        assert any(t.format(D.FASHION_MNIST_CAPTION_NAMES[lab]) == cap for t in D.TRAIN_TEMPLATES)


def test_fashion_mnist_limit_must_be_positive(tmp_path):
    make_fake_fashion_mnist(str(tmp_path), n_train=50, n_test=20, compress=False)
    assert len(D.FashionMNIST(str(tmp_path), "train", limit=7)) == 7
    with pytest.raises(ValueError, match="limit must be None or >= 1, got -5"):
        D.FashionMNIST(str(tmp_path), "train", limit=-5)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        D.load_fashion_mnist(str(tmp_path), "train")
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert "train-images-idx3-ubyte" in msg


def test_fashion_mnist_inconsistent_files(tmp_path):
    make_fake_fashion_mnist(str(tmp_path), n_train=50, n_test=20, compress=True)
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.zeros(49, np.uint8), True)
    with pytest.raises(D.DataError, match="50 images but .* 49 labels"):
        D.load_fashion_mnist(str(tmp_path), "train")
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.full(50, 10, np.uint8), True)
    with pytest.raises(D.DataError, match="label 10 out of range"):
        D.load_fashion_mnist(str(tmp_path), "train")
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.zeros((50, 2), np.uint8), True)
    with pytest.raises(D.DataError, match=r"shape \(N,\)"):
        D.load_fashion_mnist(str(tmp_path), "train")


@pytest.mark.skipif(not os.path.isdir(D.DEFAULT_FASHION_MNIST_DIR),
                    reason=f"Fashion-MNIST not installed in {D.DEFAULT_FASHION_MNIST_DIR} "
                           f"(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_files():
    for split, n in (("train", 60000), ("test", 10000)):
        imgs, labels = D.load_fashion_mnist(split=split)
        assert imgs.shape == (n, 28, 28)
        assert torch.bincount(labels, minlength=10).tolist() == [n // 10] * 10


# ------------------------------------------------------------------------ CSV / tar


def _png_bytes(value: int, size=(10, 6), mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color=(value, value, value) if mode == "RGB" else value).save(buf, "PNG")
    return buf.getvalue()


def _expected_pixel(value: int) -> float:
    return value / 127.5 - 1.0


@pytest.mark.parametrize("sep", ["\t", ","])
def test_csv_dataset(tmp_path, sep):
    (tmp_path / "img").mkdir()
    rows = []
    for i, v in enumerate((0, 100, 255)):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png_bytes(v))
        rows.append({"filepath": f"img/{i}.png", "title": f"caption number {i}"})
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["filepath", "title"], delimiter=sep)
        w.writeheader()
        w.writerows(rows)
    ds = D.CsvDataset(str(path), separator=sep, image_size=8, channels=3)
    assert len(ds) == 3
    x, caps = ds.get(torch.tensor([2, 0]), torch.Generator())
    assert x.shape == (2, 3, 8, 8)
    assert caps == ["caption number 2", "caption number 0"]
    torch.testing.assert_close(x[0], torch.full((3, 8, 8), _expected_pixel(255)))
    torch.testing.assert_close(x[1], torch.full((3, 8, 8), _expected_pixel(0)))
    gray = D.CsvDataset(str(path), separator=sep, image_size=5, channels=1)
    assert gray.get(torch.tensor([1]), torch.Generator())[0].shape == (1, 1, 5, 5)


def test_csv_errors(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("path\tcaption\nimg.png\thello\n")
    with pytest.raises(D.DataError, match="--csv-img-key"):
        D.CsvDataset(str(path))
    ds = D.CsvDataset(str(path), img_key="path", caption_key="caption")
    (tmp_path / "img.png").write_bytes(b"not an image")
    with pytest.raises(D.DataError, match="img.png: cannot decode image"):
        ds.get(torch.tensor([0]), torch.Generator())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.CsvDataset(str(tmp_path / "nope.csv"))


def _add(tf: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_tar_dataset(tmp_path):
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:03d}.tar", "w") as tf:
            for k in range(3):
                key = f"sub/{s}{k:04d}"
                _add(tf, f"{key}.png", _png_bytes(40 * k + s))
                _add(tf, f"{key}.txt", f"sample {s} {k}\n".encode())
            _add(tf, "sub/orphan.png", _png_bytes(1))      # no caption: skipped
            _add(tf, "sub/lonely.txt", b"no image")        # no image: skipped
    spec = str(tmp_path / "shard-{000..001}.tar")
    assert D.expand_shards(spec) == [str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-001.tar")]
    ds = D.TarDataset(spec, image_size=4, channels=3)
    assert len(ds) == 6
    x, caps = ds.get(torch.arange(6), torch.Generator())
    assert x.shape == (6, 3, 4, 4)
    assert caps == [f"sample {s} {k}" for s in range(2) for k in range(3)]
    for i, (s, k) in enumerate((s, k) for s in range(2) for k in range(3)):
        torch.testing.assert_close(x[i], torch.full((3, 4, 4), _expected_pixel(40 * k + s)))
    assert len(D.TarDataset(str(tmp_path), image_size=4)) == 6  # a folder of shards
    ds.close()


def test_tar_errors(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(D.DataError):
        D.TarDataset(str(tmp_path / "bad.tar"))
    with tarfile.open(tmp_path / "empty.tar", "w") as tf:
        _add(tf, "a.txt", b"caption only")
    with pytest.raises(D.DataError, match="no samples"):
        D.TarDataset(str(tmp_path / "empty.tar"))
    with pytest.raises(FileNotFoundError):
        D.TarDataset(str(tmp_path / "missing.tar"))


# ----------------------------------------------------------------- augment, tokenizer


def test_augment_is_a_crop_of_the_padded_image():
    x = torch.randn(6, 2, 5, 7)
    gen = torch.Generator().manual_seed(3)
    out = D.augment(x, gen, shift=2, flip=False)
    pad = torch.nn.functional.pad(x, (2,) * 4, value=float(x.amin()))
    for i in range(6):
        crops = [pad[i, :, dy:dy + 5, dx:dx + 7] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) for c in crops)
    again = D.augment(x, torch.Generator().manual_seed(3), shift=2, flip=True)
    assert again.shape == x.shape
    x = torch.randn(16, 2, 5, 7)  # 16 draws: seed 3 flips some and keeps others
    flipped = D.augment(x, torch.Generator().manual_seed(3), shift=0, flip=True)
    kept = [torch.equal(flipped[i], x[i]) for i in range(16)]
    mirrored = [torch.equal(flipped[i], x[i].flip(-1)) for i in range(16)]
    assert all(k or m for k, m in zip(kept, mirrored))
    assert any(kept) and any(mirrored), "both outcomes of the coin must be exercised"


def test_tokenizer_distinguishes_class_words_and_pads():
    tok = HashWordTokenizer(context_length=16)
    words = {w for name in D.FASHION_MNIST_CAPTION_NAMES for w in name.replace("-", " ").split()}
    ids = {w: tok.encode(w)[1] for w in words}
    assert len(set(ids.values())) == len(words), "hash collision between class words"
    t = tok(["a photo of a bag.", "a bag"])
    assert t.shape == (2, 7)
    assert t[1].tolist() == [tok.SOT, tok.encode("a")[1], ids["bag"], tok.EOT, tok.PAD, tok.PAD, tok.PAD]
    long = tok([" ".join(["word"] * 40)])
    assert long.shape == (1, 16) and long[0, -1].item() == tok.EOT
