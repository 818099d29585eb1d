"""Write a raw image-text pool to curate: Fashion-MNIST images with web-like alt-text.

    python examples/make_raw_pool.py --out pool/            # pool/raw.csv + pool/img/*.png

The pool is deliberately unbalanced, as scraped data is: class k gets a share
proportional to 1 / (k + 1) (T-shirts are ten times as common as ankle boots), and
a tenth of the captions are camera file names ("DSC04521") that match no query.
The other captions put the class name in a sentence with filler words, e.g.
"sale! black dress for women, free shipping".  The CSV is the trainer's format
(tab-separated, ``filepath`` and ``title`` columns).
"""
from __future__ import annotations

import argparse
import csv
import os

import numpy as np

from clip_fast.train.data import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_CAPTION_NAMES, load_fashion_mnist

PATTERNS = (
    "{adj} {name} for {who}, free shipping",
    "sale! {adj} {name}",
    "my new {name} :)",
    "{name} - {adj} - size M",
    "vintage {adj} {name} in great condition",
    "photo of a {adj} {name} on a white background",
)
ADJECTIVES = ("black", "white", "grey", "cheap", "classic", "cotton", "summer", "designer")
WHO = ("women", "men", "kids", "everyone")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=6000, help="pairs in the pool")
    ap.add_argument("--data-dir", default=DEFAULT_FASHION_MNIST_DIR)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from PIL import Image

    images, labels = load_fashion_mnist(args.data_dir, "train")
    labels = labels.numpy()
    rng = np.random.default_rng(args.seed)
    share = 1.0 / np.arange(1, 11)
    per_class = [np.flatnonzero(labels == k) for k in range(10)]
    classes = rng.choice(10, size=args.n, p=share / share.sum())
    os.makedirs(os.path.join(args.out, "img"), exist_ok=True)
    used = [0] * 10
    with open(os.path.join(args.out, "raw.csv"), "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["filepath", "title"])
        for i, k in enumerate(classes):
            idx = per_class[k][used[k] % len(per_class[k])]
            used[k] += 1
            rel = os.path.join("img", f"{i:06d}.png")
            Image.fromarray(images[idx].numpy()).save(os.path.join(args.out, rel))
            if rng.random() < 0.1:
                caption = f"DSC{rng.integers(10000, 99999)}"
            else:
                caption = PATTERNS[rng.integers(len(PATTERNS))].format(
                    adj=ADJECTIVES[rng.integers(len(ADJECTIVES))], who=WHO[rng.integers(len(WHO))],
                    name=FASHION_MNIST_CAPTION_NAMES[k])
            w.writerow([rel, caption])
    print(f"wrote {args.n} pairs to {os.path.join(args.out, 'raw.csv')} "
          f"(per class: {np.bincount(classes, minlength=10).tolist()})")


if __name__ == "__main__":
    main()
