"""The reference CLIP trainer: ``python -m clip_fast.train`` (console script ``clip-fast-train``).

A separate subpackage of clip_fast: the loss library (``import clip_fast``) never
imports it, and its needs (numpy, tqdm, matplotlib, pillow) come with the ``train``
extra.
"""
from .loop import CheckpointError, load_checkpoint, main, parse_args, run

__all__ = ["main", "run", "parse_args", "CheckpointError", "load_checkpoint"]
