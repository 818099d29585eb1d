"""Checkpoints of the reference trainer: ``<run dir>/checkpoints/last.pt``.

A checkpoint holds the step, the model and optimizer state, every process's RNG
state, the arguments that fix the data order and schedule (``RESUME_KEYS``) and the
loss it was trained with (``--loss``; a SigLIP model's state holds its ``logit_bias``),
so ``--resume`` continues a killed run exactly where it stopped.  Files are written
atomically and read with ``torch.load(weights_only=True)``, then validated.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch
import torch.distributed as dist

from ..gradcache import capture_rng
from .cli import LOSSES

CHECKPOINT_FORMAT = "clip_fast.train/1"
# Arguments that must match for --resume to continue the same run (data order, schedule).
RESUME_KEYS = ("dataset_type", "train_data", "train_limit", "batch_size", "epochs", "seed",
               "lr", "warmup", "wd", "augment", "label_smoothing", "image_to_text_weight",
               "positive_groups", "hard_negatives")
# The loss options' values in checkpoints written before those flags existed.
RESUME_DEFAULTS = {"label_smoothing": 0.0, "image_to_text_weight": 0.5, "positive_groups": "none",
                   "hard_negatives": 0}
# Checkpoints without a "loss" entry were written before --loss existed: all CLIP.
DEFAULT_LOSS = "clip"


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt, not ours, or does not match this run."""


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
    loss = ckpt.setdefault("loss", DEFAULT_LOSS)
    if not isinstance(loss, str) or loss not in LOSSES:
        got = repr(loss[:40]) if isinstance(loss, str) else type(loss).__name__
        raise CheckpointError(f"checkpoint {path!r}: entry 'loss' must be one of {LOSSES} "
                              f"(got {got})")
    return ckpt


def run_config(args: argparse.Namespace) -> Dict:
    return {k: getattr(args, k) for k in RESUME_KEYS}


def restore_from_checkpoint(ckpt: dict, path: str, model, optimizer, args, model_cfg,
                            world_size: int, rank: int) -> int:
    """Check the checkpoint matches this run, load it, return its step."""
    if ckpt["loss"] != args.loss:  # first: the model config differs too (bias, temperature)
        raise CheckpointError(f"checkpoint {path!r} was trained with --loss {ckpt['loss']} "
                              f"and this run has --loss {args.loss}; resume with "
                              f"--loss {ckpt['loss']}, or start a new run (another --name)")
    has_bias = "logit_bias" in ckpt["model"]
    if has_bias != (args.loss == "siglip"):
        raise CheckpointError(f"checkpoint {path!r} is marked --loss {args.loss} but its "
                              f"weights {'have' if has_bias else 'lack'} a logit_bias")
    if ckpt["model_config"] != model_cfg.to_dict():
        diff = sorted(k for k in set(ckpt["model_config"]) | set(model_cfg.to_dict())
                      if ckpt["model_config"].get(k) != model_cfg.to_dict().get(k))
        raise CheckpointError(f"checkpoint {path!r} was written for a different model; "
                              f"differing settings: " + ", ".join(
                                  f"{k}={ckpt['model_config'].get(k)!r} (this run: "
                                  f"{model_cfg.to_dict().get(k)!r})" for k in diff))
    mine = run_config(args)
    theirs = {k: ckpt["run_config"].get(k, RESUME_DEFAULTS.get(k)) for k in RESUME_KEYS}
    diff = [k for k in RESUME_KEYS if theirs[k] != mine[k]]
    if diff:
        raise CheckpointError(f"checkpoint {path!r} belongs to a run with other arguments; "
                              "resume with the same ones: " + ", ".join(
                                  f"{k}={theirs[k]!r} (this run: {mine[k]!r})" for k in diff))
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


def save_checkpoint(path: str, step: int, epoch: int, model, optimizer, model_cfg,
                    args: argparse.Namespace, device: torch.device, world_size: int,
                    main: bool) -> None:
    """Write ``path`` (rank 0) with every process's RNG state; all processes must call it."""
    rng = capture_rng(device)
    if world_size > 1:
        gathered: List = [None] * world_size
        dist.all_gather_object(gathered, {k: v.cpu() for k, v in rng.items()})
        rngs = gathered
    else:
        rngs = [rng]
    if main:
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "step": step, "epoch": epoch,
            "model_config": model_cfg.to_dict(), "run_config": run_config(args),
            "loss": args.loss,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rngs,
            "world_size": world_size,
        }, path)
