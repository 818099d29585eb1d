"""CLIP's data recipe: build a query list, match captions against it, balance the matches.

Run it as ``python -m clip_fast.curate queries|match|balance``; see ``__main__`` for the
options and the README for a worked example.  ``import clip_fast`` does not import this
subpackage: its dependencies (``pip install clip-fast[curate]``) are for curation only.
"""
from .errors import CurateError

__all__ = ["CurateError"]
