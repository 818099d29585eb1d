"""The repository's top-level ``kernels/`` folder must not pass for the Hub's ``kernels`` package.

In a clip_fast source checkout the Triton kernels live in ``kernels/`` beside ``clip_fast/``
and ``setup.py`` (installed as ``clip_fast.kernels``).  With the checkout's root on
``sys.path`` (``python -m ...`` or ``PYTHONPATH`` there) that folder is importable as a
top-level ``kernels``; transformers probes ``find_spec("kernels")`` for the Hugging Face
Hub's package of that name, then imports it, and that import fails.
"""
from __future__ import annotations

import importlib.util
import os
import sys


def hide_checkout_kernels() -> None:
    """Make ``kernels`` unimportable when it resolves to a clip_fast checkout's folder.

    A ``None`` entry in ``sys.modules`` makes ``find_spec`` answer None and ``import kernels``
    raise ImportError, as when the Hub's package is not installed.  An installed Hub package
    (no ``setup.py`` and ``clip_fast/`` beside it) is left alone.
    """
    if "kernels" in sys.modules:
        return
    spec = importlib.util.find_spec("kernels")
    if spec is None or not spec.origin:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))
    if (os.path.isfile(os.path.join(root, "setup.py"))
            and os.path.isfile(os.path.join(root, "clip_fast", "__init__.py"))):
        sys.modules["kernels"] = None
