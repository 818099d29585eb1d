"""Reference CLIP trainer: ``python -m clip_fast.train`` (console script ``clip-fast-train``).

With no flags it trains a small CNN image tower and a small text Transformer on
Fashion-MNIST (captions from class names through prompt templates) with the
symmetric contrastive loss from :class:`clip_fast.FastClipLoss`, and reports
zero-shot top-1/top-5 on the test split after every epoch.  ``--loss siglip`` trains
with SigLIP's sigmoid loss (:class:`clip_fast.FastSigLipLoss`) instead; the model then
has a learned logit bias, and scale and bias start at SigLIP's 10 and -10.

* ``--batch-size`` is the contrastive batch (over all processes); with
  ``--micro-batch-size`` smaller, each step is gradient-cached
  (:mod:`clip_fast.gradcache`), so the batch can be the whole training set.
* Under ``torchrun`` it runs DistributedDataParallel (gloo on CPU, NCCL on GPU)
  with the distributed FastClipLoss (``local_loss=True, gather_with_grad=True``), or the
  distributed FastSigLipLoss (open_clip's default ``dist_impl``, "bidir").
* Output goes to ``<logs-dir>/<name>``: ``metrics.csv``, ``metrics.png``,
  ``log.txt``, ``args.json``, ``summary.json`` and ``checkpoints/last.pt``
  (written atomically); ``--resume`` continues a killed run where it stopped.

A run is :func:`setup` (flags, data, model, optimizer, loss, run folder, resume),
then :func:`train_loop` (one :func:`train_step` per step, with logging, zero-shot
evaluation and checkpoints on schedule), then :func:`finish` (summary and plot).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import FastClipLoss, FastSigLipLoss
from ..gradcache import grad_cache_step, plain_step
from ..zero_shot import zero_shot_classifier, zero_shot_eval
from . import data as data_mod
from .checkpoint import (CheckpointError, load_checkpoint, restore_from_checkpoint,
                         save_checkpoint)
from .cli import parse_args
from .metrics import MetricsLog, peak_memory_mb, plot_metrics
from .models import CLIP, SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_TEMPERATURE, ModelConfig
from .process_group import ProcessGroup

__all__ = ["run", "main", "parse_args", "CheckpointError", "load_checkpoint"]


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



# ------------------------------------------------------------------------------ setup


@dataclass
class Schedule:
    """How the training set is cut into steps, and each process's share of a step."""

    n_train: int
    steps_per_epoch: int
    total_steps: int
    local_batch: int  # this process's share of the contrastive batch
    micro_batch: int  # encoder chunk; smaller than local_batch turns on gradient caching

    @property
    def cached(self) -> bool:
        return self.micro_batch < self.local_batch


@dataclass
class Trainer:
    """Everything one run needs, built by :func:`setup` before the first step."""

    args: argparse.Namespace
    env: ProcessGroup
    use_bf16: bool
    autocast: Callable[[], ContextManager]
    train_ds: object
    test: Optional[Tuple[torch.Tensor, torch.Tensor]]  # Fashion-MNIST only: zero-shot eval
    sched: Schedule
    model_cfg: ModelConfig
    model: CLIP
    optimizer: torch.optim.Optimizer
    loss_fn: torch.nn.Module  # make_loss: FastClipLoss or FastSigLipLoss
    run_dir: str
    ckpt_path: str
    start_step: int
    resumed: bool
    metrics: Optional[MetricsLog] = None
    ddp: Optional[torch.nn.Module] = None

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def fwd(self) -> torch.nn.Module:
        """The module the steps call: the DDP wrapper under torchrun, else the model."""
        return self.ddp if self.ddp is not None else self.model


def build_dataset(args):
    if args.dataset_type == "fashion-mnist":
        return data_mod.FashionMNIST(args.data_dir, "train", limit=args.train_limit)
    if args.train_limit is not None:  # before reading the CSV or indexing the shards
        raise SystemExit("--train-limit only applies to Fashion-MNIST")
    if args.dataset_type == "csv":
        return data_mod.CsvDataset(args.train_data, args.csv_img_key, args.csv_caption_key,
                                   args.csv_separator, args.image_size, args.channels)
    return data_mod.TarDataset(args.train_data, args.image_size, args.channels)



def load_data(args: argparse.Namespace):
    """The training set and, for Fashion-MNIST, the (normalised) test split; errors exit."""
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
    return train_ds, test


def plan_schedule(args: argparse.Namespace, n_train: int, world_size: int) -> Schedule:
    """Whole steps only: the last partial batch of each epoch is dropped."""
    if args.batch_size % world_size:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the number of "
                         f"processes ({world_size})")
    steps_per_epoch = n_train // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the training set "
                         f"({n_train} samples)")
    local_batch = args.batch_size // world_size
    return Schedule(n_train=n_train, steps_per_epoch=steps_per_epoch,
                    total_steps=steps_per_epoch * args.epochs, local_batch=local_batch,
                    micro_batch=args.micro_batch_size or local_batch)


def build_model(args: argparse.Namespace, train_ds, device: torch.device,
                rank: int) -> Tuple[CLIP, ModelConfig]:
    """The CLIP of ``args``, initialised from ``--seed`` alone, then each rank's dropout seed.

    ``--loss siglip`` adds a learned logit bias and starts scale and bias at SigLIP's 10
    and -10; the towers' weights do not depend on the loss.
    """
    siglip = args.loss == "siglip"
    model_cfg = ModelConfig(
        image_encoder=args.model, image_size=train_ds.image_size, in_channels=train_ds.channels,
        embed_dim=args.embed_dim, cnn_widths=args.cnn_widths,
        cnn_stem_stride=args.cnn_stem_stride, vit_patch=args.vit_patch,
        vit_width=args.vit_width, vit_layers=args.vit_layers, text_tower=args.text_tower,
        text_width=args.text_width,
        text_layers=args.text_layers, dropout=args.dropout,
        init_temperature=SIGLIP_INIT_TEMPERATURE if siglip else ModelConfig.init_temperature,
        init_logit_bias=SIGLIP_INIT_LOGIT_BIAS if siglip else None)
    torch.manual_seed(args.seed)
    try:
        model = CLIP(model_cfg).to(device)
    except ImportError as exc:
        raise SystemExit(f"error: {exc}")
    torch.manual_seed(args.seed * 1000 + 1 + rank)  # per-rank dropout stream
    return model, model_cfg


def make_loss(args: argparse.Namespace, env: ProcessGroup) -> torch.nn.Module:
    """The loss of ``--loss`` for this process: each rank passes its own share of the batch."""
    if args.loss == "siglip":
        return FastSigLipLoss(rank=env.rank, world_size=env.world_size, backend=args.backend,
                              chunk_size=args.chunk_size)
    return FastClipLoss(local_loss=True, gather_with_grad=True, rank=env.rank,
                        world_size=env.world_size, backend=args.backend,
                        chunk_size=args.chunk_size, label_smoothing=args.label_smoothing,
                        image_to_text_weight=args.image_to_text_weight,
                        matryoshka_dims=args.matryoshka_dims)


def resume_or_start(args: argparse.Namespace, env: ProcessGroup, run_dir: str,
                    ckpt_path: str, model, optimizer, model_cfg: ModelConfig,
                    total_steps: int) -> int:
    """The step to start from: the checkpoint's under ``--resume``, else 0 in a fresh folder."""
    if args.resume is None:
        if env.main and os.path.exists(os.path.join(run_dir, "metrics.csv")):
            raise SystemExit(f"error: run folder {run_dir!r} already has a run; pick another "
                             f"--name or continue it with --resume")
        return 0
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
    return start_step


def setup(argv: Optional[List[str]] = None) -> Trainer:
    """Parse ``argv`` and build the run: data, model, optimizer, loss, run folder, resume.

    Data comes first, so a missing dataset fails before anything is written.
    """
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = ProcessGroup(args.device)
    device = env.device
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16
                else contextlib.nullcontext)
    train_ds, test = load_data(args)
    sched = plan_schedule(args, len(train_ds), env.world_size)
    model, model_cfg = build_model(args, train_ds, device, env.rank)
    optimizer = make_optimizer(model, args.lr, args.wd)
    loss_fn = make_loss(args, env)

    name = args.name or time.strftime(
        f"{args.dataset_type}-{args.model}-%Y%m%d-%H%M%S", time.gmtime())
    run_dir = os.path.join(args.logs_dir, name)
    ckpt_path = os.path.join(run_dir, "checkpoints", "last.pt")
    start_step = resume_or_start(args, env, run_dir, ckpt_path, model, optimizer, model_cfg,
                                 sched.total_steps)
    t = Trainer(args=args, env=env, use_bf16=use_bf16, autocast=autocast, train_ds=train_ds,
                test=test, sched=sched, model_cfg=model_cfg, model=model, optimizer=optimizer,
                loss_fn=loss_fn, run_dir=run_dir, ckpt_path=ckpt_path, start_step=start_step,
                resumed=args.resume is not None)
    if env.main:
        os.makedirs(os.path.dirname(ckpt_path), exist_ok=True)
    env.barrier()
    t.metrics = MetricsLog(run_dir, start_step if t.resumed else None, env.main,
                           with_bias=model.logit_bias is not None,
                           extra_fields=tuple(f"zs_top1_d{d}" for d in eval_dims(args)))
    if env.main and not t.resumed:
        with open(os.path.join(run_dir, "args.json"), "w") as fh:
            json.dump({k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
                      fh, indent=1)
    if env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        t.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                        else None, broadcast_buffers=False)
    t.metrics.log(describe(t))
    return t


def describe(t: Trainer) -> str:
    """The run's first log line: data, model, batch, device, precision, loss and machine."""
    args, env, sched = t.args, t.env, t.sched
    n_params = sum(p.numel() for p in t.model.parameters())
    return (
        f"run {t.run_dir}: {args.dataset_type} ({sched.n_train} train samples), model "
        f"{args.model} ({n_params / 1e6:.2f} M params), contrastive batch {args.batch_size} over "
        f"{env.world_size} process(es), micro-batch {sched.micro_batch}"
        f"{' (gradient caching)' if sched.cached else ''}, {sched.total_steps} steps, "
        f"device {t.device}, {'bf16 autocast' if t.use_bf16 else 'fp32'}, loss {t.loss_fn!r}"
        f"{_batch_options(args)}; "
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.2f}" + (f"; resumed at step {t.start_step}" if t.resumed else ""))


def _batch_options(args) -> str:
    """The per-batch loss inputs the flags add (positive groups, hard negatives), for the log line."""
    out = []
    if getattr(args, "positive_groups", "none") != "none":
        out.append(f"positive groups by {args.positive_groups}")
    if getattr(args, "hard_negatives", 0):
        out.append(f"{args.hard_negatives} hard-negative captions")
    return f" with {' and '.join(out)}" if out else ""


# ------------------------------------------------------------------------------ steps


def evaluate(t: Trainer) -> Dict[str, float]:
    """Zero-shot top-1/top-5 on the test split, with all templates and held-out ones alone."""
    model = t.model
    model.eval()
    clf = {"all": zero_shot_classifier(model, data_mod.FASHION_MNIST_CAPTION_NAMES,
                                       data_mod.TRAIN_TEMPLATES + data_mod.HELDOUT_TEMPLATES),
           "heldout": zero_shot_classifier(model, data_mod.FASHION_MNIST_CAPTION_NAMES,
                                           data_mod.HELDOUT_TEMPLATES)}
    autocast = t.autocast if t.use_bf16 else None
    res = zero_shot_eval(model, clf, t.test, batch_size=1000, device=t.device, autocast=autocast)
    out = {"zs_top1": res["all_top1"], "zs_top5": res["all_top5"], "zs_heldout_top1": res["heldout_top1"]}
    for d in eval_dims(t.args):  # each nested size on its own: the first d dimensions
        prefix = PrefixModel(model, d)
        clf_d = zero_shot_classifier(prefix, data_mod.FASHION_MNIST_CAPTION_NAMES,
                                     data_mod.TRAIN_TEMPLATES + data_mod.HELDOUT_TEMPLATES)
        out[f"zs_top1_d{d}"] = zero_shot_eval(prefix, clf_d, t.test, batch_size=1000, device=t.device,
                                              autocast=autocast)["top1"]
    model.train()
    return out


def eval_dims(args) -> Tuple[int, ...]:
    """The prefix sizes whose zero-shot accuracy is reported: --matryoshka-dims and --eval-dims."""
    sizes = set(getattr(args, "matryoshka_dims", None) or ()) | set(getattr(args, "eval_dims", None) or ())
    return tuple(sorted(sizes))


class PrefixModel(torch.nn.Module):
    """A model's embeddings cut to their first ``dim`` dimensions (the zero-shot helpers
    normalise them): one nested size of a Matryoshka-trained model."""

    def __init__(self, model: torch.nn.Module, dim: int):
        super().__init__()
        self.model, self.dim = model, dim
        self.tokenizer = model.tokenizer

    def encode_image(self, images):
        return self.model.encode_image(images)[:, :self.dim]

    def encode_text(self, tokens):
        return self.model.encode_text(tokens)[:, :self.dim]


def load_batch(t: Trainer, step: int, gidx: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """This process's images, tokens and loss extras for global batch indices ``gidx``, on
    the device.

    In-memory data draws captions and augmentation for the whole global batch from the
    step's generator, then keeps this rank's slice, so the result does not depend on the
    world size; streamed data (CSV, tar) reads only this rank's slice.  The extras
    (:func:`batch_loss_inputs`) are the step functions' ``group_ids`` and ``neg_tokens``.
    """
    args, rank, local = t.args, t.env.rank, t.sched.local_batch
    flip = args.augment in ("flip", "flip-shift")
    shift = 2 if args.augment in ("shift", "flip-shift") else 0
    lo, hi = rank * local, (rank + 1) * local
    if isinstance(t.train_ds, data_mod.FashionMNIST):
        gen = step_generator(args.seed, step)
        images, captions = t.train_ds.get(gidx, gen)
        images = data_mod.augment(images, gen, shift=shift, flip=flip)[lo:hi]
        captions = captions[lo:hi]
        extras = batch_loss_inputs(t, gidx, gen, lo, hi)
    else:
        extras = {}
        gen = step_generator(args.seed, step, rank)
        images, captions = t.train_ds.get(gidx[lo:hi], gen)
        images = data_mod.augment(images, gen, shift=shift, flip=flip)
    images = images.to(t.device, non_blocking=True)
    # One tokenizer call for the captions and the hard negatives: one padded width, which
    # plain_step's single text-tower call over both needs.
    negs = extras.pop("neg_captions", None)
    tokens = t.model.tokenizer(captions + (negs or [])).to(t.device, non_blocking=True)
    if negs is not None:
        tokens, extras["neg_tokens"] = tokens[:len(captions)], tokens[len(captions):]
    return images, tokens, {k: v.to(t.device) for k, v in extras.items()}


def batch_loss_inputs(t: Trainer, gidx: torch.Tensor, gen: torch.Generator, lo: int, hi: int) -> dict:
    """Fashion-MNIST's per-batch loss inputs that the loss options ask for, this rank's share.

    ``--positive-groups class``: ``group_ids``, the class labels of this rank's samples.
    ``--hard-negatives K``: ``neg_captions``, for each of the global batch's first K images a
    caption naming another class (drawn from the step's generator after the captions and the
    augmentation, so runs without the flag draw exactly as before); a rank keeps those of
    its own images, so the negatives do not depend on the world size either.
    """
    args, extras = t.args, {}
    if args.positive_groups == "class":
        extras["group_ids"] = t.train_ds.class_ids(gidx[lo:hi])
    if args.hard_negatives:
        neg = t.train_ds.negative_captions(gidx[:args.hard_negatives], gen)
        extras["neg_captions"] = neg[lo:hi]
    return extras


def train_step(t: Trainer, step: int, images: torch.Tensor, tokens: torch.Tensor,
               extras: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, float]:
    """One optimizer step (gradient-cached when the micro-batch is smaller); (loss, lr).
    ``extras``: the step functions' ``group_ids`` and ``neg_tokens`` (:func:`load_batch`)."""
    extras = extras or {}
    lr = lr_at(step, t.sched.total_steps, t.args.lr, t.args.warmup)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    t.optimizer.zero_grad(set_to_none=True)
    if t.sched.cached:
        loss = grad_cache_step(t.fwd, images, tokens, t.loss_fn, t.sched.micro_batch,
                               autocast=t.autocast,
                               no_sync=t.ddp.no_sync if t.ddp is not None else None, **extras)
    else:
        loss = plain_step(t.fwd, images, tokens, t.loss_fn, autocast=t.autocast, **extras)
    t.optimizer.step()
    t.model.clamp_logit_scale()
    return loss, lr


@dataclass
class Progress:
    """What the loop carries between steps: timers, the last loss and the last evaluation."""

    t_start: float = field(default_factory=time.perf_counter)
    t_last: float = 0.0
    samples_since: int = 0
    loss_val: float = float("nan")
    last_eval: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.t_last = self.t_start


def loss_row(t: Trainer, p: Progress, done: int, loss: torch.Tensor, lr: float) -> dict:
    """The metrics row of step ``done``: the global loss (mean over ranks) and the speed."""
    if t.env.world_size > 1:  # the mean of the ranks' local losses
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= t.env.world_size
    p.loss_val = float(loss)
    if not math.isfinite(p.loss_val):
        raise SystemExit(f"error: loss became {p.loss_val} at step {done}; lower --lr")
    now = time.perf_counter()
    scale = float(t.model.logit_scale.detach().exp())
    row = {"step": done, "epoch": f"{done / t.sched.steps_per_epoch:.3f}",
           "loss": f"{p.loss_val:.5f}", "logit_scale": f"{scale:.3f}",
           "temperature": f"{1.0 / scale:.5f}", "lr": f"{lr:.3e}",
           "samples_per_s": f"{p.samples_since / max(now - p.t_last, 1e-9):.1f}",
           "peak_mem_mb": f"{peak_memory_mb(t.device):.1f}",
           "elapsed_s": f"{now - p.t_start:.2f}"}
    if t.model.logit_bias is not None:
        row["logit_bias"] = f"{float(t.model.logit_bias.detach()):.4f}"
    p.t_last, p.samples_since = now, 0
    return row


def eval_row(t: Trainer, p: Progress, done: int, row: Optional[dict]) -> Optional[dict]:
    """Rank 0 evaluates and adds the accuracies to ``row``; every rank waits for it."""
    if t.env.main:
        p.last_eval = evaluate(t)
        row = row or {"step": done, "epoch": f"{done / t.sched.steps_per_epoch:.3f}"}
        row.update({k: f"{v:.4f}" for k, v in p.last_eval.items()})
        row["elapsed_s"] = f"{time.perf_counter() - p.t_start:.2f}"
        e = p.last_eval
        scalars = ("" if t.model.logit_bias is None else
                   f" (logit scale {float(t.model.scale().detach()):.3f}, bias "
                   f"{float(t.model.logit_bias.detach()):.4f})")
        t.metrics.log(f"step {done}/{t.sched.total_steps} epoch "
                      f"{done / t.sched.steps_per_epoch:.2f}: loss {p.loss_val:.4f}{scalars}, "
                      f"zero-shot top-1 {e['zs_top1']:.4f} top-5 {e['zs_top5']:.4f} (held-out "
                      f"templates top-1 {e['zs_heldout_top1']:.4f}){_per_size(e)}, "
                      f"{time.perf_counter() - p.t_start:.1f} s")
    t.env.barrier()
    return row


def _per_size(e: Dict[str, float]) -> str:
    """The nested sizes' zero-shot top-1 for the log line ('' without --matryoshka-dims)."""
    sizes = [(k[len("zs_top1_d"):], v) for k, v in e.items() if k.startswith("zs_top1_d")]
    return "".join(f", top-1 at d={d} {v:.4f}" for d, v in sizes)


def progress_bar(t: Trainer):
    """A tqdm bar on rank 0 unless ``--no-progress``; None without tqdm."""
    if not t.env.main or t.args.no_progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=t.sched.total_steps, initial=t.start_step, dynamic_ncols=True, unit="step")


# ------------------------------------------------------------------------------ main


def train_loop(t: Trainer) -> Progress:
    """Steps ``start_step`` to the end: log, evaluate, checkpoint and plot on schedule."""
    args, sched = t.args, t.sched
    pbar = progress_bar(t)
    t.model.train()
    p = Progress()
    perm, perm_epoch = None, -1
    for step in range(t.start_step, sched.total_steps):
        epoch, pos = divmod(step, sched.steps_per_epoch)
        if epoch != perm_epoch:
            perm, perm_epoch = epoch_permutation(args.seed, epoch, sched.n_train), epoch
        images, tokens, extras = load_batch(
            t, step, perm[pos * args.batch_size:(pos + 1) * args.batch_size])
        loss, lr = train_step(t, step, images, tokens, extras)
        done = step + 1
        p.samples_since += args.batch_size

        end_of_epoch = done % sched.steps_per_epoch == 0  # the last step is one (whole epochs)
        row = None
        if done % args.log_every == 0 or end_of_epoch:
            row = loss_row(t, p, done, loss, lr)
        if t.test is not None and (end_of_epoch or (
                args.zeroshot_every and done % args.zeroshot_every == 0)):
            row = eval_row(t, p, done, row)
        if row is not None:
            t.metrics.write(row)
        if end_of_epoch or (args.save_every and done % args.save_every == 0):
            save_checkpoint(t.ckpt_path, done, done // sched.steps_per_epoch, t.model,
                            t.optimizer, t.model_cfg, args, t.device, t.env.world_size,
                            t.env.main)
            if t.env.main and t.test is not None and end_of_epoch and done < sched.total_steps:
                plot_metrics(t.metrics.rows, os.path.join(t.run_dir, "metrics.png"))
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{p.loss_val:.3f}", lr=f"{lr:.1e}")
    if pbar is not None:
        pbar.close()
    return p


def finish(t: Trainer, p: Progress) -> Dict:
    """Write summary.json and the last plot (rank 0), close the process group; the summary."""
    env = t.env
    elapsed = time.perf_counter() - p.t_start
    summary = {"run_dir": t.run_dir, "steps": t.sched.total_steps,
               "resumed_from": t.start_step if t.resumed else None,
               "train_seconds": round(elapsed, 2), "final_loss": p.loss_val,
               "peak_mem_mb": round(peak_memory_mb(t.device), 1), **p.last_eval,
               "world_size": env.world_size, "batch_size": t.args.batch_size,
               "micro_batch_size": t.sched.micro_batch, "device": str(t.device),
               "torch": torch.__version__, "python": platform.python_version(),
               "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
               "load_average": list(os.getloadavg()),
               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if t.model.logit_bias is not None:
        summary.update(loss=t.args.loss, logit_scale=float(t.model.scale().detach()),
                       logit_bias=float(t.model.logit_bias.detach()))
    if env.main:
        if t.test is not None:  # the last epoch's plot (the loop plots the earlier ones)
            plot_metrics(t.metrics.rows, os.path.join(t.run_dir, "metrics.png"))
        with open(os.path.join(t.run_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
        t.metrics.log(f"done: {t.sched.total_steps} steps in {elapsed:.1f} s; peak memory "
                      f"{summary['peak_mem_mb']} MB; outputs in {t.run_dir}")
    if env.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def run(argv: Optional[List[str]] = None) -> Dict:
    """Train with command-line arguments ``argv``; return the run's summary dict."""
    t = setup(argv)
    return finish(t, train_loop(t))


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry point (``clip-fast-train``); returns None so the exit status is 0."""
    run(argv)
