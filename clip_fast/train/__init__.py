"""The reference CLIP trainer: ``python -m clip_fast.train`` (console script ``clip-fast-train``).

A separate subpackage of clip_fast: the loss library (``import clip_fast``) never
imports it, and its needs (numpy, tqdm, matplotlib, pillow) come with the ``train``
extra.  numpy is the one it cannot run without; tqdm and matplotlib are skipped when
missing, and pillow is only needed for CSV and tar-shard images.
"""
try:
    import numpy  # noqa: F401
except ImportError as exc:
    raise ImportError("clip_fast.train needs numpy, which comes with the trainer's extra: "
                      "pip install 'clip-fast[train]'") from exc

from .loop import CheckpointError, load_checkpoint, main, parse_args, run

__all__ = ["main", "run", "parse_args", "CheckpointError", "load_checkpoint"]
