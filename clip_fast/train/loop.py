"""Reference CLIP trainer: ``python -m clip_fast.train`` (console script ``clip-fast-train``).

With no flags it trains a small CNN image tower and a small text Transformer on
Fashion-MNIST (captions from class names through prompt templates) with the
symmetric contrastive loss from :class:`clip_fast.FastClipLoss`, and reports
zero-shot top-1/top-5 on the test split after every epoch.

* ``--batch-size`` is the contrastive batch (over all processes); with
  ``--micro-batch-size`` smaller, each step is gradient-cached
  (:mod:`clip_fast.gradcache`), so the batch can be the whole training set.
* Under ``torchrun`` it runs DistributedDataParallel (gloo on CPU, NCCL on GPU)
  with the distributed FastClipLoss (``local_loss=True, gather_with_grad=True``).
* Output goes to ``<logs-dir>/<name>``: ``metrics.csv``, ``metrics.png``,
  ``log.txt``, ``args.json``, ``summary.json`` and ``checkpoints/last.pt``
  (written atomically); ``--resume`` continues a killed run where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import resource
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from . import data as data_mod
from ..gradcache import capture_rng, grad_cache_step, plain_step
from .models import CLIP, ModelConfig
from ..zero_shot import zero_shot_classifier, zero_shot_eval

CHECKPOINT_FORMAT = "clip_fast.train/1"
METRIC_FIELDS = ("step", "epoch", "loss", "logit_scale", "temperature", "lr", "samples_per_s",
                 "peak_mem_mb", "elapsed_s", "zs_top1", "zs_top5", "zs_heldout_top1")
# Arguments that must match for --resume to continue the same run (data order, schedule).
RESUME_KEYS = ("dataset_type", "train_data", "train_limit", "batch_size", "epochs", "seed",
               "lr", "warmup", "wd", "augment")


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt, not ours, or does not match this run."""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m clip_fast.train",
        description="Train a small CLIP with clip_fast.FastClipLoss (default: Fashion-MNIST, "
                    "zero-shot evaluation on its test split).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset-type", default="auto",
                   choices=("auto", "fashion-mnist", "csv", "webdataset"),
                   help="auto: csv for a .csv/.tsv --train-data, webdataset for tar shards, "
                        "else fashion-mnist")
    g.add_argument("--data-dir", default=data_mod.DEFAULT_FASHION_MNIST_DIR,
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
    o.add_argument("--backend", default="auto", help="FastClipLoss backend")
    o.add_argument("--chunk-size", type=int, default=None, help="FastClipLoss chunk size")
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
    return args


# ----------------------------------------------------------------------------- utils


class Dist:
    """Process-group facts; world_size 1 when not launched by torchrun."""

    def __init__(self, device_arg: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
        if want_cuda:
            idx = self.local_rank if self.world_size > 1 else torch.cuda.current_device()
            if device_arg.startswith("cuda:") and self.world_size == 1:
                idx = int(device_arg.split(":")[1])
            torch.cuda.set_device(idx)
            self.device = torch.device("cuda", idx)
        else:
            self.device = torch.device(device_arg if device_arg not in ("auto",) else "cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1.0 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(model: torch.nn.Module, lr: float, wd: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains, biases and the temperature (CLIP's choice)."""
    decay, no_decay = [], []
    for _, prm in sorted(model.named_parameters()):
        (decay if prm.ndim >= 2 else no_decay).append(prm)
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The data RNG of one step (templates, augmentation): a function of seed and step only."""
    return torch.Generator().manual_seed(((seed & 0xFFFFFFF) << 32) + (step << 8) + rank)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def atomic_torch_save(obj, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then os.replace."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """torch.load(weights_only=True) and structural validation; CheckpointError if bad."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle garbage, disallowed globals ...
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a clip_fast checkpoint "
                              f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {path!r} is not a {CHECKPOINT_FORMAT} checkpoint "
                              f"(format: {got!r})")
    expected = {"step": int, "model_config": dict, "run_config": dict, "model": dict,
                "optimizer": dict, "rng": list}
    for key, typ in expected.items():
        if not isinstance(ckpt.get(key), typ):
            raise CheckpointError(f"checkpoint {path!r}: entry {key!r} missing or not a "
                                  f"{typ.__name__} (got {type(ckpt.get(key)).__name__})")
    if ckpt["step"] < 0:
        raise CheckpointError(f"checkpoint {path!r}: negative step {ckpt['step']}")
    return ckpt


def run_config(args: argparse.Namespace) -> Dict:
    return {k: getattr(args, k) for k in RESUME_KEYS}


def restore_from_checkpoint(ckpt: dict, path: str, model, optimizer, args, model_cfg,
                            world_size: int, rank: int) -> int:
    """Check the checkpoint matches this run, load it, return its step."""
    if ckpt["model_config"] != model_cfg.to_dict():
        diff = sorted(k for k in set(ckpt["model_config"]) | set(model_cfg.to_dict())
                      if ckpt["model_config"].get(k) != model_cfg.to_dict().get(k))
        raise CheckpointError(f"checkpoint {path!r} was written for a different model; "
                              f"differing settings: " + ", ".join(
                                  f"{k}={ckpt['model_config'].get(k)!r} (this run: "
                                  f"{model_cfg.to_dict().get(k)!r})" for k in diff))
    mine = run_config(args)
    diff = [k for k in RESUME_KEYS if ckpt["run_config"].get(k) != mine[k]]
    if diff:
        raise CheckpointError(f"checkpoint {path!r} belongs to a run with other arguments; "
                              "resume with the same ones: " + ", ".join(
                                  f"{k}={ckpt['run_config'].get(k)!r} (this run: {mine[k]!r})"
                                  for k in diff))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: weights do not fit the model: {exc}") from exc
    rngs = ckpt["rng"]
    if len(rngs) != world_size and rank == 0:
        print(f"warning: checkpoint {path!r} holds RNG states for {len(rngs)} process(es), this "
              f"run has {world_size}; dropout draws will differ from an uninterrupted run",
              file=sys.stderr)
    if len(rngs) == world_size:
        state = rngs[rank]
        if not isinstance(state, dict) or not isinstance(state.get("cpu"), torch.Tensor):
            raise CheckpointError(f"checkpoint {path!r}: bad RNG state")
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    return int(ckpt["step"])


class MetricsLog:
    """metrics.csv (one row per logged step) and log.txt, written by rank 0 only."""

    def __init__(self, run_dir: str, resume_step: Optional[int], enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.csv")
        self.log_path = os.path.join(run_dir, "log.txt")
        self.rows: List[dict] = []
        if not enabled:
            return
        if resume_step is not None and os.path.isfile(self.path):
            # Keep the rows up to the checkpoint; later ones are redone after the resume.
            with open(self.path, newline="") as fh:
                self.rows = [r for r in csv.DictReader(fh)
                             if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(self.rows)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: row.get(k, "") for k in METRIC_FIELDS}
        self.rows.append(row)
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=METRIC_FIELDS).writerow(row)

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        print(msg, flush=True)
        with open(self.log_path, "a") as fh:
            fh.write(msg + "\n")


def plot_metrics(rows: List[dict], path: str) -> Optional[str]:
    """Loss, temperature and zero-shot accuracy against step, as a PNG (matplotlib Agg)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # matplotlib is optional
        return f"no plot ({type(exc).__name__}: {exc})"

    def series(key):
        pts = [(int(r["step"]), float(r[key])) for r in rows if str(r.get(key, "")) != ""]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(*series("loss"))
    axes[0].set_title("contrastive loss")
    axes[1].plot(*series("temperature"))
    axes[1].set_title("temperature (1 / logit scale)")
    for key, label in (("zs_top1", "top-1"), ("zs_top5", "top-5"),
                       ("zs_heldout_top1", "top-1, held-out templates")):
        axes[2].plot(*series(key), marker="o", label=label)
    axes[2].set_title("zero-shot accuracy (test)")
    axes[2].legend(loc="lower right")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return None


def build_dataset(args):
    if args.dataset_type == "fashion-mnist":
        return data_mod.FashionMNIST(args.data_dir, "train", limit=args.train_limit)
    if args.train_limit is not None:  # before reading the CSV or indexing the shards
        raise SystemExit("--train-limit only applies to Fashion-MNIST")
    if args.dataset_type == "csv":
        return data_mod.CsvDataset(args.train_data, args.csv_img_key, args.csv_caption_key,
                                   args.csv_separator, args.image_size, args.channels)
    return data_mod.TarDataset(args.train_data, args.image_size, args.channels)


# ------------------------------------------------------------------------------ main


def run(argv: Optional[List[str]] = None) -> Dict:
    """Train with command-line arguments ``argv``; return the run's summary dict."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = Dist(args.device)
    device = env.device
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16
                else contextlib.nullcontext)

    # Data first: a missing dataset should fail before anything is written.
    try:
        train_ds = build_dataset(args)
        test = None
        if args.dataset_type == "fashion-mnist":
            imgs, labels = data_mod.load_fashion_mnist(args.data_dir, "test")
            if args.test_limit is not None:
                imgs, labels = imgs[: args.test_limit], labels[: args.test_limit]
            test = (data_mod.normalize_fashion_mnist(imgs), labels)
    except (FileNotFoundError, data_mod.DataError) as exc:
        raise SystemExit(f"error: {exc}")
    n_train = len(train_ds)
    if args.batch_size % env.world_size:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the number of "
                         f"processes ({env.world_size})")
    steps_per_epoch = n_train // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the training set "
                         f"({n_train} samples)")
    total_steps = steps_per_epoch * args.epochs
    local_bs = args.batch_size // env.world_size
    micro = args.micro_batch_size or local_bs

    model_cfg = ModelConfig(
        image_encoder=args.model, image_size=train_ds.image_size, in_channels=train_ds.channels,
        embed_dim=args.embed_dim, cnn_widths=args.cnn_widths,
        cnn_stem_stride=args.cnn_stem_stride, vit_patch=args.vit_patch,
        vit_width=args.vit_width, vit_layers=args.vit_layers, text_tower=args.text_tower,
        text_width=args.text_width,
        text_layers=args.text_layers, dropout=args.dropout)
    torch.manual_seed(args.seed)
    try:
        model = CLIP(model_cfg).to(device)
    except ImportError as exc:
        raise SystemExit(f"error: {exc}")
    torch.manual_seed(args.seed * 1000 + 1 + env.rank)  # per-rank dropout stream
    optimizer = make_optimizer(model, args.lr, args.wd)

    from ..loss import FastClipLoss
    loss_fn = FastClipLoss(local_loss=True, gather_with_grad=True, rank=env.rank,
                           world_size=env.world_size, backend=args.backend,
                           chunk_size=args.chunk_size)

    name = args.name or time.strftime(
        f"{args.dataset_type}-{args.model}-%Y%m%d-%H%M%S", time.gmtime())
    run_dir = os.path.join(args.logs_dir, name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    ckpt_path = os.path.join(ckpt_dir, "last.pt")

    start_step = 0
    resume_path = None
    if args.resume is not None:
        resume_path = ckpt_path if args.resume == "auto" else args.resume
        try:
            ckpt = load_checkpoint(resume_path)
            start_step = restore_from_checkpoint(ckpt, resume_path, model, optimizer, args,
                                                 model_cfg, env.world_size, env.rank)
        except CheckpointError as exc:
            raise SystemExit(f"error: {exc}")
        if start_step > total_steps:
            raise SystemExit(f"error: checkpoint step {start_step} is past the end of this run "
                             f"({total_steps} steps)")
        del ckpt
    elif env.main and os.path.exists(os.path.join(run_dir, "metrics.csv")):
        raise SystemExit(f"error: run folder {run_dir!r} already has a run; pick another --name "
                         f"or continue it with --resume")
    if env.main:
        os.makedirs(ckpt_dir, exist_ok=True)
    env.barrier()
    metrics = MetricsLog(run_dir, start_step if resume_path else None, env.main)
    if env.main and not resume_path:
        with open(os.path.join(run_dir, "args.json"), "w") as fh:
            json.dump({k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
                      fh, indent=1)

    ddp = None
    if env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None, broadcast_buffers=False)
    fwd = ddp if ddp is not None else model

    n_params = sum(p.numel() for p in model.parameters())
    metrics.log(
        f"run {run_dir}: {args.dataset_type} ({n_train} train samples), model {args.model} "
        f"({n_params / 1e6:.2f} M params), contrastive batch {args.batch_size} over "
        f"{env.world_size} process(es), micro-batch {micro}"
        f"{' (gradient caching)' if micro < local_bs else ''}, {total_steps} steps, "
        f"device {device}, {'bf16 autocast' if use_bf16 else 'fp32'}, loss {loss_fn!r}; "
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.2f}" + (f"; resumed at step {start_step}" if resume_path else ""))

    eval_zero_shot = test is not None  # Fashion-MNIST: class names to build classifiers from

    def evaluate() -> Dict[str, float]:
        model.eval()
        clf = {"all": zero_shot_classifier(model, data_mod.FASHION_MNIST_CAPTION_NAMES,
                                           data_mod.TRAIN_TEMPLATES + data_mod.HELDOUT_TEMPLATES),
               "heldout": zero_shot_classifier(model, data_mod.FASHION_MNIST_CAPTION_NAMES,
                                               data_mod.HELDOUT_TEMPLATES)}
        res = zero_shot_eval(model, clf, test, batch_size=1000, device=device, autocast=(
            autocast if use_bf16 else None))
        model.train()
        return {"zs_top1": res["all_top1"], "zs_top5": res["all_top5"],
                "zs_heldout_top1": res["heldout_top1"]}

    def save(step: int) -> None:
        rng = capture_rng(device)
        if env.world_size > 1:
            gathered: List = [None] * env.world_size
            dist.all_gather_object(gathered, {k: v.cpu() for k, v in rng.items()})
            rngs = gathered
        else:
            rngs = [rng]
        if env.main:
            atomic_torch_save({
                "format": CHECKPOINT_FORMAT, "step": step, "epoch": step // steps_per_epoch,
                "model_config": model_cfg.to_dict(), "run_config": run_config(args),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rngs,
                "world_size": env.world_size,
            }, ckpt_path)

    pbar = None
    if env.main and not args.no_progress:
        try:
            from tqdm import tqdm
            pbar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")
        except ImportError:
            pbar = None

    flip = args.augment in ("flip", "flip-shift")
    shift = 2 if args.augment in ("shift", "flip-shift") else 0
    in_memory = isinstance(train_ds, data_mod.FashionMNIST)
    model.train()
    t_start = time.perf_counter()
    t_last, samples_since = t_start, 0
    perm, perm_epoch = None, -1
    last_eval: Dict[str, float] = {}
    loss_val = float("nan")
    for step in range(start_step, total_steps):
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
            perm, perm_epoch = epoch_permutation(args.seed, epoch, n_train), epoch
        gidx = perm[pos * args.batch_size:(pos + 1) * args.batch_size]
        lo, hi = env.rank * local_bs, (env.rank + 1) * local_bs
        if in_memory:  # draw for the global batch so the result does not depend on world size
            gen = step_generator(args.seed, step)
            images, captions = train_ds.get(gidx, gen)
            images = data_mod.augment(images, gen, shift=shift, flip=flip)[lo:hi]
            captions = captions[lo:hi]
        else:
            gen = step_generator(args.seed, step, env.rank)
            images, captions = train_ds.get(gidx[lo:hi], gen)
            images = data_mod.augment(images, gen, shift=shift, flip=flip)
        images = images.to(device, non_blocking=True)
        tokens = model.tokenizer(captions).to(device, non_blocking=True)

        lr = lr_at(step, total_steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        if micro < local_bs:
            loss = grad_cache_step(fwd, images, tokens, loss_fn, micro, autocast=autocast,
                                   no_sync=ddp.no_sync if ddp is not None else None)
        else:
            loss = plain_step(fwd, images, tokens, loss_fn, autocast=autocast)
        optimizer.step()
        model.clamp_logit_scale()
        done = step + 1
        samples_since += args.batch_size

        end_of_epoch = done % steps_per_epoch == 0  # the last step is one (whole epochs)
        row = None
        if done % args.log_every == 0 or end_of_epoch:
            if env.world_size > 1:  # log the global loss: the mean of the ranks' local losses
                loss = loss.clone()
                dist.all_reduce(loss)
                loss /= env.world_size
            loss_val = float(loss)
            if not math.isfinite(loss_val):
                raise SystemExit(f"error: loss became {loss_val} at step {done}; lower --lr")
            now = time.perf_counter()
            scale = float(model.logit_scale.detach().exp())
            row = {"step": done, "epoch": f"{done / steps_per_epoch:.3f}",
                   "loss": f"{loss_val:.5f}", "logit_scale": f"{scale:.3f}",
                   "temperature": f"{1.0 / scale:.5f}", "lr": f"{lr:.3e}",
                   "samples_per_s": f"{samples_since / max(now - t_last, 1e-9):.1f}",
                   "peak_mem_mb": f"{peak_memory_mb(device):.1f}",
                   "elapsed_s": f"{now - t_start:.2f}"}
            t_last, samples_since = now, 0
        if eval_zero_shot and (end_of_epoch or (
                args.zeroshot_every and done % args.zeroshot_every == 0)):
            if env.main:
                last_eval = evaluate()
                row = row or {"step": done, "epoch": f"{done / steps_per_epoch:.3f}"}
                row.update({k: f"{v:.4f}" for k, v in last_eval.items()})
                row["elapsed_s"] = f"{time.perf_counter() - t_start:.2f}"
                metrics.log(f"step {done}/{total_steps} epoch {done / steps_per_epoch:.2f}: "
                            f"loss {loss_val:.4f}, zero-shot top-1 {last_eval['zs_top1']:.4f} "
                            f"top-5 {last_eval['zs_top5']:.4f} (held-out templates top-1 "
                            f"{last_eval['zs_heldout_top1']:.4f}), "
                            f"{time.perf_counter() - t_start:.1f} s")
            env.barrier()
        if row is not None:
            metrics.write(row)
        if end_of_epoch or (args.save_every and done % args.save_every == 0):
            save(done)
            if env.main and eval_zero_shot and end_of_epoch and done < total_steps:
                plot_metrics(metrics.rows, os.path.join(run_dir, "metrics.png"))
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.1e}")
    if pbar is not None:
        pbar.close()

    elapsed = time.perf_counter() - t_start
    summary = {"run_dir": run_dir, "steps": total_steps, "resumed_from": start_step if resume_path
               else None, "train_seconds": round(elapsed, 2), "final_loss": loss_val,
               "peak_mem_mb": round(peak_memory_mb(device), 1), **last_eval,
               "world_size": env.world_size, "batch_size": args.batch_size,
               "micro_batch_size": micro, "device": str(device), "torch": torch.__version__,
               "python": platform.python_version(), "cpus": os.cpu_count(),
               "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if env.main:
        if eval_zero_shot:  # the last epoch's plot (the loop plots the earlier ones)
            plot_metrics(metrics.rows, os.path.join(run_dir, "metrics.png"))
        with open(os.path.join(run_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
        metrics.log(f"done: {total_steps} steps in {elapsed:.1f} s; peak memory "
                    f"{summary['peak_mem_mb']} MB; outputs in {run_dir}")
    if env.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry point (``clip-fast-train``); returns None so the exit status is 0."""
    run(argv)

