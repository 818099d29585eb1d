"""Helpers for the trainer tests: tiny idx files and a tiny model's command line."""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
          np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def write_idx(path: str, arr: np.ndarray, compress: bool = False) -> str:
    """Write ``arr`` as an idx file (big-endian payload), gzip-compressed if asked."""
    dtype = arr.dtype if arr.dtype.itemsize == 1 else arr.dtype.newbyteorder(">")
    head = bytes([0, 0, _CODES[np.dtype(dtype)], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    blob = head + arr.astype(dtype).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as fh:
        fh.write(blob)
    return path


def make_fake_fashion_mnist(folder: str, n_train: int = 960, n_test: int = 200,
                            seed: int = 0, compress: bool = True) -> str:
    """Fashion-MNIST-shaped idx files: class c is a grating of its own orientation and
    frequency (what a small CNN with global pooling can tell apart) plus noise."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    protos = np.stack([
        127.5 + 127.5 * np.sin((np.cos(th) * xx + np.sin(th) * yy) * fr)
        for th, fr in zip(np.arange(10) * np.pi / 5, 0.5 + 0.6 * (np.arange(10) % 2))])

    def split(n):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        imgs = 0.7 * protos[labels] + 0.3 * rng.integers(0, 256, size=(n, 28, 28))
        return imgs.clip(0, 255).astype(np.uint8), labels.astype(np.uint8)

    ext = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs, labels = split(n)
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}"), imgs, compress)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}"), labels, compress)
    return folder


# A model small enough for a CPU test step in a few milliseconds.
TINY_MODEL = ["--cnn-widths", "8,16", "--embed-dim", "16", "--text-width", "32",
              "--text-layers", "1", "--threads", "1", "--no-progress"]


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_args(fake_dir, logs, name, *extra):
    """The trainer's command line for a tiny run on the fake data, in ``logs/name``."""
    return ["--data-dir", fake_dir, "--logs-dir", str(logs), "--name", name, *TINY_MODEL, *extra]


def metrics_rows(run_dir):
    """A run's metrics.csv as a list of dicts (strings)."""
    import csv

    with open(os.path.join(run_dir, "metrics.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def single_and_torchrun(fake_dir, tmp_path, common, ddp_extra=()):
    """Run ``common`` in this process ("single") and under torchrun with 2 gloo processes
    ("ddp", plus ``ddp_extra``); return both runs' metrics rows and last checkpoints."""
    import subprocess
    import sys

    from clip_fast.train import load_checkpoint, run

    run(run_args(fake_dir, tmp_path, "single", *common))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "clip_fast.train", *run_args(fake_dir, tmp_path, "ddp", *common, *ddp_extra)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [metrics_rows(tmp_path / name) for name in ("single", "ddp")]
    ckpts = [load_checkpoint(str(tmp_path / name / "checkpoints" / "last.pt")) for name in ("single", "ddp")]
    return rows, ckpts
