"""Command line of the reference trainer: ``python -m clip_fast.train --help``."""
from __future__ import annotations

import argparse
from typing import List, Optional

from .data import DEFAULT_FASHION_MNIST_DIR

LOSSES = ("clip", "siglip")  # --loss: FastClipLoss or FastSigLipLoss


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags and defaults, in five groups: data, model, optimisation, run, loss options
    (long as the flag list is: one add_argument per flag, nothing else)."""
    p = argparse.ArgumentParser(
        prog="python -m clip_fast.train",
        description="Train a small CLIP with clip_fast.FastClipLoss, or with SigLIP's sigmoid "
                    "loss (clip_fast.FastSigLipLoss, --loss siglip) (default: Fashion-MNIST, "
                    "zero-shot evaluation on its test split).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset-type", default="auto",
                   choices=("auto", "fashion-mnist", "csv", "webdataset"),
                   help="auto: csv for a .csv/.tsv --train-data, webdataset for tar shards, "
                        "else fashion-mnist")
    g.add_argument("--data-dir", default=DEFAULT_FASHION_MNIST_DIR,
                   help="folder with the Fashion-MNIST idx files (.gz or not)")
    g.add_argument("--train-data", default=None,
                   help="CSV file, or tar shards ('a.tar::b.tar', a folder, 'shard-{000..009}.tar')")
    g.add_argument("--csv-img-key", default="filepath")
    g.add_argument("--csv-caption-key", default="title")
    g.add_argument("--csv-separator", default="\t")
    g.add_argument("--image-size", type=int, default=64, help="resize size for CSV/tar images")
    g.add_argument("--channels", type=int, default=3, choices=(1, 3),
                   help="image channels for CSV/tar images")
    g.add_argument("--train-limit", type=int, default=None, help="use the first N training samples")
    g.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images")
    g.add_argument("--augment", default="flip", choices=("none", "flip", "shift", "flip-shift"))
    m = p.add_argument_group("model")
    m.add_argument("--model", default="cnn", choices=("cnn", "vit"), help="image encoder")
    m.add_argument("--embed-dim", type=int, default=64)
    m.add_argument("--cnn-widths", default="32,64,128")
    m.add_argument("--cnn-stem-stride", type=int, default=2, choices=(1, 2))
    m.add_argument("--vit-width", type=int, default=128)
    m.add_argument("--vit-layers", type=int, default=4)
    m.add_argument("--vit-patch", type=int, default=4)
    m.add_argument("--text-tower", default="transformer", choices=("transformer", "minilm"),
                   help="minilm: frozen pretrained all-MiniLM-L6-v2 (LiT-style), needs the [lit] extra")
    m.add_argument("--text-width", type=int, default=128)
    m.add_argument("--text-layers", type=int, default=2)
    m.add_argument("--dropout", type=float, default=0.0)
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=2)
    o.add_argument("--batch-size", type=int, default=512,
                   help="contrastive batch size, over all processes")
    o.add_argument("--micro-batch-size", type=int, default=None,
                   help="encoder chunk per process; smaller than the per-process batch turns on "
                        "gradient caching (default: no caching)")
    o.add_argument("--lr", type=float, default=2e-3)
    o.add_argument("--wd", type=float, default=0.1)
    o.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--loss", default="clip", choices=LOSSES,
                   help="clip: softmax loss (FastClipLoss); siglip: sigmoid loss "
                        "(FastSigLipLoss) with a learned logit bias, init scale 10, bias -10")
    o.add_argument("--backend", default="auto", help="loss backend (FastClipLoss/FastSigLipLoss)")
    o.add_argument("--chunk-size", type=int, default=None, help="loss chunk size")
    o.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    o.add_argument("--device", default="auto", help="auto, cpu, cuda")
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r = p.add_argument_group("run")
    r.add_argument("--logs-dir", default="./runs")
    r.add_argument("--name", default=None, help="run name (default: <dataset>-<model>-<time>)")
    r.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="checkpoint to resume from; bare --resume: <run dir>/checkpoints/last.pt")
    r.add_argument("--save-every", type=int, default=0,
                   help="also checkpoint every N steps (always at epoch ends)")
    r.add_argument("--zeroshot-every", type=int, default=0,
                   help="also evaluate every N steps (always at epoch ends)")
    r.add_argument("--log-every", type=int, default=1, help="metrics.csv row every N steps")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    add_loss_options(p)
    return p


def add_loss_options(p: argparse.ArgumentParser) -> None:
    """The CLIP loss family's options (``clip_fast.clip_loss``; derivation in clip_fast/targets.py)."""
    g = p.add_argument_group("loss options")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="epsilon in [0, 1), as in torch.nn.CrossEntropyLoss (ALIGN: 0.1)")
    g.add_argument("--image-to-text-weight", type=float, default=0.5,
                   help="lambda in [0, 1]: lambda * CE(image->text) + (1 - lambda) * CE(text->image); "
                        "0.5 is CLIP")
    g.add_argument("--positive-groups", default="none", choices=("none", "class"),
                   help="class: samples of the same Fashion-MNIST class are positives of each other "
                        "(group_ids = class labels); Fashion-MNIST only")
    g.add_argument("--matryoshka-dims", default=None, metavar="D1,D2,...",
                   help="nested embedding sizes, e.g. 16,32,64: the loss is the sum of the CLIP loss on "
                        "each L2-normalised prefix (one sweep, clip_fast.clip_loss(matryoshka_dims=...)), and "
                        "zero-shot accuracy is reported at each size; one process, --loss clip")
    g.add_argument("--eval-dims", default=None, metavar="D1,D2,...",
                   help="also report zero-shot top-1 on the first D dimensions of the embeddings at these "
                        "sizes (the sizes of --matryoshka-dims are always reported); the loss is unchanged")
    g.add_argument("--hard-negatives", type=int, default=0, metavar="K",
                   help="for each of the first K images of every contrastive batch, one caption naming "
                        "another (random) class joins every image's softmax as a hard-negative text; "
                        "Fashion-MNIST only")


def check_loss_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The loss options in range, and the data-dependent ones on data that has class labels."""
    if not 0.0 <= args.label_smoothing < 1.0:
        p.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if not 0.0 <= args.image_to_text_weight <= 1.0:
        p.error(f"--image-to-text-weight must be in [0, 1], got {args.image_to_text_weight}")
    if args.hard_negatives < 0:
        p.error(f"--hard-negatives must be >= 0, got {args.hard_negatives}")
    if args.hard_negatives > args.batch_size:
        p.error(f"--hard-negatives must be <= --batch-size ({args.batch_size}): one negative caption "
                f"per image of the batch's first K, got {args.hard_negatives}")
    for flag in ("matryoshka_dims", "eval_dims"):
        value = getattr(args, flag)
        if value is None:
            continue
        name = "--" + flag.replace("_", "-")
        try:
            sizes = tuple(int(d) for d in value.split(","))
        except ValueError:
            p.error(f"{name} must be comma-separated ints, got {value!r}")
        if any(not 1 <= d <= args.embed_dim for d in sizes) or len(set(sizes)) != len(sizes):
            p.error(f"{name} must be distinct sizes in [1, --embed-dim] = [1, {args.embed_dim}], got {value}")
        setattr(args, flag, sizes)
    if args.loss != "clip":  # the options belong to the CLIP (softmax) loss
        for flag, value, off in (("--label-smoothing", args.label_smoothing, 0.0),
                                 ("--matryoshka-dims", args.matryoshka_dims, None),
                                 ("--image-to-text-weight", args.image_to_text_weight, 0.5),
                                 ("--positive-groups", args.positive_groups, "none"),
                                 ("--hard-negatives", args.hard_negatives, 0)):
            if value != off:
                p.error(f"{flag} applies to --loss clip only, got {flag} {value} with --loss {args.loss}")
    if args.dataset_type != "fashion-mnist":
        for flag, value, off in (("--positive-groups", args.positive_groups, "none"),
                                 ("--hard-negatives", args.hard_negatives, 0)):
            if value != off:
                p.error(f"{flag} {value} needs class labels, which only --dataset-type fashion-mnist "
                        f"has; --dataset-type {args.dataset_type} (--train-data {args.train_data}) "
                        f"has captions only")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and check ``argv``: counts in range, the dataset type resolved, widths as ints."""
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("micro_batch_size", "train_limit", "test_limit"):  # None: not given
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "save_every", "zeroshot_every"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.dataset_type == "auto":
        if args.train_data is None:
            args.dataset_type = "fashion-mnist"
        elif args.train_data.lower().endswith((".csv", ".tsv")):
            args.dataset_type = "csv"
        else:
            args.dataset_type = "webdataset"
    if args.dataset_type in ("csv", "webdataset") and args.train_data is None:
        p.error(f"--dataset-type {args.dataset_type} needs --train-data")
    try:
        args.cnn_widths = tuple(int(w) for w in args.cnn_widths.split(","))
    except ValueError:
        p.error(f"--cnn-widths must be comma-separated ints, got {args.cnn_widths!r}")
    check_loss_options(p, args)
    return args

