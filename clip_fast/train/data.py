"""Image-text data for the reference trainer (``python -m clip_fast.train``).

Three sources, one interface (``len(ds)`` and ``ds.get(indices, generator)`` returning
a float image batch ``(B, C, H, W)`` and a list of ``B`` captions):

* ``FashionMNIST``: the standard idx files (``train-images-idx3-ubyte[.gz]`` ...), by
  default from ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package
  ``dataset-fashion-mnist``).  Captions are class names put through prompt templates.
* ``CsvDataset``: open_clip's CSV format (an image-path column and a caption column).
* ``TarDataset``: webdataset-style tar shards (``key.jpg``/``key.png`` + ``key.txt``),
  read with the standard ``tarfile`` module.

Everything read from disk is untrusted: idx headers are checked against the file
size, member sizes are capped, and every failure names the file it came from.
"""
from __future__ import annotations

import csv
import gzip
import io
import math
import os
import re
import tarfile
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# The names put into captions (lower case, "/" spelled out).
FASHION_MNIST_CAPTION_NAMES = (
    "t-shirt or top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
# Templates used to caption training images (one drawn at random per image).
TRAIN_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "a photo of the {}.",
    "a product photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of the {}.",
    "a grayscale image of the {}.",
)
# Templates never seen in training; zero-shot evaluation also reports them alone.
HELDOUT_TEMPLATES = (
    "a photo of my {}.",
    "a small photo of the {}.",
    "a blurry photo of a {}.",
    "a cropped picture of the {}.",
    "there is a {} in this photo.",
    "an item of clothing: a {}.",
)

# Fashion-MNIST pixel statistics (training split), used to normalise its images.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_MAX_BYTES = 1 << 31  # 2 GiB: far above Fashion-MNIST, stops decompression bombs


class DataError(ValueError):
    """A data file is missing, malformed or inconsistent."""


# --------------------------------------------------------------------------- idx


def read_idx(path: str, max_bytes: int = _IDX_MAX_BYTES) -> np.ndarray:
    """Read one idx file (optionally gzip-compressed) into a numpy array.

    The header is validated: zero bytes, a known type code, 1..4 dimensions, every
    dimension >= 1, and a payload of exactly prod(dims) * itemsize bytes.
    """
    with open(path, "rb") as raw:
        head = raw.read(2)
        raw.seek(0)
        fh = gzip.GzipFile(fileobj=raw) if head == b"\x1f\x8b" else raw
        try:
            header = fh.read(4)
            if len(header) != 4:
                raise DataError(f"{path}: not an idx file (only {len(header)} header bytes)")
            if header[0] != 0 or header[1] != 0:
                raise DataError(f"{path}: not an idx file (magic number {header.hex()} does "
                                f"not start with two zero bytes)")
            type_code, ndim = header[2], header[3]
            if type_code not in _IDX_DTYPES:
                raise DataError(f"{path}: unknown idx type code 0x{type_code:02x}")
            if not 1 <= ndim <= 4:
                raise DataError(f"{path}: idx file declares {ndim} dimensions (expected 1..4)")
            dims_raw = fh.read(4 * ndim)
            if len(dims_raw) != 4 * ndim:
                raise DataError(f"{path}: truncated idx header")
            dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
            if any(d == 0 for d in dims):
                raise DataError(f"{path}: idx file declares an empty dimension {dims}")
            dtype = _IDX_DTYPES[type_code]
            n_bytes = math.prod(dims) * dtype.itemsize  # Python ints: no overflow
            if n_bytes > max_bytes:
                raise DataError(f"{path}: idx dims {dims} declare {n_bytes} bytes "
                                f"(limit {max_bytes})")
            payload = fh.read(n_bytes + 1)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DataError(f"{path}: cannot read idx file: {exc}") from exc
    if len(payload) < n_bytes:
        raise DataError(f"{path}: idx payload truncated: header dims {dims} need {n_bytes} "
                        f"bytes, file has {len(payload)}")
    if len(payload) > n_bytes:
        raise DataError(f"{path}: idx file has trailing bytes after the {n_bytes}-byte payload")
    return np.frombuffer(payload, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(data_dir: str, stem: str) -> Optional[str]:
    for name in (stem, stem + ".gz"):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    return None


def missing_fashion_mnist_message(data_dir: str, missing: Sequence[str]) -> str:
    return (
        f"Fashion-MNIST not found in {data_dir!r} (missing: {', '.join(missing)}).\n"
        f"Get it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; puts "
        f"the idx files in {DEFAULT_FASHION_MNIST_DIR}), or download the four idx files "
        f"(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        f"t10k-labels-idx1-ubyte.gz) from https://github.com/zalandoresearch/fashion-mnist "
        f"and pass --data-dir DIR."
    )


def load_fashion_mnist(data_dir: str = DEFAULT_FASHION_MNIST_DIR,
                       split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 (N, 28, 28), labels int64 (N,))`` for ``split``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find_idx(data_dir, s) for s in stems]
    missing = [s + "[.gz]" for s, p in zip(stems, paths) if p is None]
    if missing:
        raise FileNotFoundError(missing_fashion_mnist_message(data_dir, missing))
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"{paths[0]}: expected uint8 images of shape (N, H, W), got "
                        f"{images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{paths[1]}: expected uint8 labels of shape (N,), got "
                        f"{labels.dtype} {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has "
                        f"{labels.shape[0]} labels")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{paths[1]}: label {int(labels.max())} out of range "
                        f"0..{len(FASHION_MNIST_CLASSES) - 1}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def normalize_fashion_mnist(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W), normalised with the training statistics."""
    x = images_u8.unsqueeze(1).float().div_(255.0)
    return x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)


class FashionMNIST:
    """Fashion-MNIST in memory; each image is captioned by a random training template."""

    def __init__(self, data_dir: str = DEFAULT_FASHION_MNIST_DIR, split: str = "train",
                 templates: Sequence[str] = TRAIN_TEMPLATES, limit: Optional[int] = None):
        if limit is not None and limit < 1:  # a negative slice would drop the tail silently
            raise ValueError(f"limit must be None or >= 1, got {limit}")
        self.images, self.labels = load_fashion_mnist(data_dir, split)
        if limit is not None:
            self.images, self.labels = self.images[:limit], self.labels[:limit]
        self.templates = tuple(templates)
        self.classnames = FASHION_MNIST_CAPTION_NAMES
        self.channels, self.image_size = 1, int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def get(self, indices: torch.Tensor, generator: torch.Generator):
        t_idx = torch.randint(len(self.templates), (len(indices),), generator=generator)
        labels = self.labels[indices].tolist()
        captions = [self.templates[t].format(self.classnames[c])
                    for t, c in zip(t_idx.tolist(), labels)]
        return normalize_fashion_mnist(self.images[indices]), captions

    def class_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """The class label (0..9, int64) of each sample."""
        return self.labels[indices]

    def negative_captions(self, indices: torch.Tensor, generator: torch.Generator) -> List[str]:
        """For each sample, a caption naming another class: the class uniform over the
        other nine, the template uniform over this dataset's templates (hard negatives)."""
        n, c = len(indices), len(self.classnames)
        other = (self.labels[indices] + torch.randint(1, c, (n,), generator=generator)) % c
        t_idx = torch.randint(len(self.templates), (n,), generator=generator)
        return [self.templates[t].format(self.classnames[k])
                for t, k in zip(t_idx.tolist(), other.tolist())]


# ------------------------------------------------------------------- user images

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
_MAX_MEMBER_BYTES = 64 << 20


def decode_image(data: bytes, image_size: int, channels: int, where: str) -> torch.Tensor:
    """Decode image bytes with PIL, resize to a square, scale to [-1, 1] -> (C, S, S)."""
    from PIL import Image  # Pillow ships with torchvision; imported here to keep import light

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            im = im.resize((image_size, image_size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # PIL raises many types for bad files
        raise DataError(f"{where}: cannot decode image: {type(exc).__name__}: {exc}") from exc
    x = torch.from_numpy(arr.copy()).float().div_(127.5).sub_(1.0)
    return x.unsqueeze(0) if channels == 1 else x.permute(2, 0, 1).contiguous()


class CsvDataset:
    """open_clip's CSV format: one row per image, an image-path and a caption column.

    Relative image paths are resolved against the CSV file's folder.
    """

    def __init__(self, path: str, img_key: str = "filepath", caption_key: str = "title",
                 separator: str = "\t", image_size: int = 64, channels: int = 3):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--train-data: CSV file {path!r} does not exist")
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter=separator)
            fields = reader.fieldnames or []
            for key, flag in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
                if key not in fields:
                    raise DataError(f"{path}: no column {key!r} ({flag}); the header has "
                                    f"{fields} with separator {separator!r} (--csv-separator)")
            rows = [(r[img_key], r[caption_key]) for r in reader]
        if not rows:
            raise DataError(f"{path}: no data rows")
        base = os.path.dirname(os.path.abspath(path))
        self.paths = [p if os.path.isabs(p) else os.path.join(base, p) for p, _ in rows]
        self.captions = [c if c is not None else "" for _, c in rows]
        self.image_size, self.channels = image_size, channels
        self.classnames = None

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, indices: torch.Tensor, generator: torch.Generator):
        idx = indices.tolist()
        imgs = []
        for i in idx:
            with open(self.paths[i], "rb") as fh:
                data = fh.read(_MAX_MEMBER_BYTES + 1)
            if len(data) > _MAX_MEMBER_BYTES:
                raise DataError(f"{self.paths[i]}: image larger than {_MAX_MEMBER_BYTES} bytes")
            imgs.append(decode_image(data, self.image_size, self.channels, self.paths[i]))
        return torch.stack(imgs), [self.captions[i] for i in idx]


def expand_shards(spec: str) -> List[str]:
    """Expand a shard spec: ``a.tar::b.tar``, a folder (all its ``*.tar``) or ``x-{000..009}.tar``."""
    out: List[str] = []
    for part in spec.split("::"):
        m = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if m:
            lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
            out += [part[:m.start()] + str(i).zfill(width) + part[m.end():]
                    for i in range(lo, hi + 1)]
        elif os.path.isdir(part):
            out += sorted(os.path.join(part, f) for f in os.listdir(part)
                          if f.endswith((".tar", ".tar.gz", ".tgz")))
        else:
            out.append(part)
    return out


class TarDataset:
    """webdataset-style tar shards: members ``<key>.<jpg|png|...>`` and ``<key>.txt``.

    The key is the member path up to the first dot of its file name (webdataset's
    rule).  Samples missing either part are skipped.  Uncompressed tars give fast
    random access; ``.tar.gz`` works but every read decompresses from the start.
    """

    def __init__(self, spec: str, image_size: int = 64, channels: int = 3):
        self.shards = expand_shards(spec)
        if not self.shards:
            raise DataError(f"--train-data {spec!r}: no tar shards found")
        self._tars: List[Optional[tarfile.TarFile]] = [None] * len(self.shards)
        self.samples: List[Tuple[int, tarfile.TarInfo, tarfile.TarInfo]] = []
        for s, shard in enumerate(self.shards):
            if not os.path.isfile(shard):
                raise FileNotFoundError(f"--train-data: tar shard {shard!r} does not exist")
            try:
                with tarfile.open(shard, "r:*") as tf:
                    groups: dict = {}
                    for m in tf.getmembers():
                        if not m.isfile():
                            continue
                        d, base = os.path.split(m.name)
                        if "." not in base:
                            continue
                        stem, ext = base.split(".", 1)
                        groups.setdefault(os.path.join(d, stem), {})[ext.lower()] = m
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise DataError(f"{shard}: cannot read tar shard: {exc}") from exc
            for key in sorted(groups):
                g = groups[key]
                img = next((g[e] for e in _IMAGE_EXTS if e in g), None)
                if img is not None and "txt" in g:
                    self.samples.append((s, img, g["txt"]))
        if not self.samples:
            raise DataError(f"{spec!r}: no samples with both an image "
                            f"({'/'.join(_IMAGE_EXTS)}) and a .txt caption")
        self.image_size, self.channels = image_size, channels
        self.classnames = None

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, s: int, member: tarfile.TarInfo) -> bytes:
        if member.size > _MAX_MEMBER_BYTES:
            raise DataError(f"{self.shards[s]}:{member.name}: member larger than "
                            f"{_MAX_MEMBER_BYTES} bytes")
        if self._tars[s] is None:
            self._tars[s] = tarfile.open(self.shards[s], "r:*")
        fh = self._tars[s].extractfile(member)
        if fh is None:
            raise DataError(f"{self.shards[s]}:{member.name}: not a regular file")
        return fh.read()

    def get(self, indices: torch.Tensor, generator: torch.Generator):
        imgs, caps = [], []
        for i in indices.tolist():
            s, img_m, txt_m = self.samples[i]
            where = f"{self.shards[s]}:{img_m.name}"
            imgs.append(decode_image(self._read(s, img_m), self.image_size, self.channels, where))
            caps.append(self._read(s, txt_m).decode("utf-8", errors="replace").strip())
        return torch.stack(imgs), caps

    def close(self) -> None:
        for tf in self._tars:
            if tf is not None:
                tf.close()
        self._tars = [None] * len(self.shards)


# ------------------------------------------------------------------ augmentation


def augment(images: torch.Tensor, generator: torch.Generator, shift: int = 0,
            flip: bool = False) -> torch.Tensor:
    """Random horizontal flip and random translation by up to ``shift`` pixels.

    Draws from ``generator`` only, so a batch's augmentation is a function of the
    data seed and step (resumable, and identical in a gradient-cache re-run).
    """
    b = images.shape[0]
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5
        images = torch.where(mask[:, None, None, None], images.flip(-1), images)
    if shift > 0:
        h, w = images.shape[-2:]
        pad_val = float(images.amin())
        padded = torch.nn.functional.pad(images, (shift,) * 4, value=pad_val)
        dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B,1,H,1)
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (B,1,1,W)
        bidx = torch.arange(b)[:, None, None, None]
        cidx = torch.arange(images.shape[1])[None, :, None, None]
        images = padded[bidx, cidx, rows, cols]
    return images
