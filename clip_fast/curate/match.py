"""Match captions against the query list, by one of two rules.

``metaclip`` (the default) is the rule of MetaCLIP's released ``substr_matching.py``:

1. the caption is padded with a space at each end; each of ``, . ; : ? !`` and the
   backtick gets a space on either side; tabs, newlines and carriage returns become
   spaces.  Nothing else changes: case is kept and runs of spaces stay;
2. an entry ``e`` matches when ``" e "`` (the entry as written, between two spaces) is a
   substring of that text.  Matching is case-sensitive, so "A Dog" does not give
   ``dog``; ``-``, ``/``, ``(``, ``#`` and ``'`` are not separators, so "dog-friendly",
   "(dog)", "#dog" and "dog/cat" do not give ``dog``, and "T-shirt" gives ``T-shirt`` but
   not ``shirt``.  An entry holding one of the padded characters ("St. Louis") never
   matches, because the caption's "." is padded and the entry's is not.

``lenient`` folds case and accepts any boundary that is not a letter or digit: entries
and captions are lower-cased, ``_`` read as a space and runs of whitespace collapsed,
and a hit counts when the characters just before and after it are not letters or
digits (or are the caption's ends).  "cat" then matches "A Cat." and "(cat)" but not
"category".

Under both rules one Aho-Corasick automaton (``pyahocorasick``) holds every entry, so a
caption is scanned once whatever the list's size, and every occurrence is reported,
overlapping ones included ("new york" and "york" both match "new york city").  An entry
found twice in a caption is listed once.
"""
from __future__ import annotations

import functools
import os
from typing import List, Sequence

from .errors import CurateError
from .queries import normalize_entry, read_queries

MATCH_RULES = ("metaclip", "lenient")
DEFAULT_MATCH_RULE = "metaclip"

# MetaCLIP's spacing: characters that get a space on either side, and characters that
# become a space.
_PADDED = ",.;:?!`"
_TO_SPACE = "\t\n\r"
_SPACING_TABLE = str.maketrans({**{c: f" {c} " for c in _PADDED}, **{c: " " for c in _TO_SPACE}})


def metaclip_spacing(text: str) -> str:
    """The caption as MetaCLIP's matcher reads it (step 1 of the module doc)."""
    return f" {text} ".translate(_SPACING_TABLE)


def fold(text: str) -> str:
    """The lenient rule's form of an entry or caption: lower case, ``_`` as a space,
    single spaces."""
    return normalize_entry(text).lower()


def check_rule(rule: str) -> str:
    if rule not in MATCH_RULES:
        raise CurateError(f"match rule must be one of {', '.join(MATCH_RULES)}; got {rule!r}")
    return rule


class Matcher:
    """An Aho-Corasick automaton over ``entries``; :meth:`match` returns the entries found
    under ``rule`` (``"metaclip"`` or ``"lenient"``, see the module doc)."""

    def __init__(self, entries: Sequence[str], rule: str = DEFAULT_MATCH_RULE):
        import ahocorasick

        self.rule = check_rule(rule)
        key = fold if rule == "lenient" else normalize_entry
        index: dict = {}
        for e in entries:
            e = key(e)
            if e:
                index.setdefault(e, len(index))
        if not index:
            raise ValueError("Matcher needs at least one non-empty entry")
        self.entries: List[str] = list(index)
        auto = ahocorasick.Automaton(ahocorasick.STORE_INTS)
        for e, i in index.items():
            # MetaCLIP's rule looks for the entry between two spaces; the lenient rule
            # looks for the bare entry and checks its neighbours afterwards.
            auto.add_word(f" {e} " if rule == "metaclip" else e, i)
        auto.make_automaton()
        self._auto = auto
        self._lengths = [len(e) for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def match_ids(self, caption: str) -> List[int]:
        """Indices of the entries found in ``caption``, each once, in order of first end."""
        if self.rule == "metaclip":
            return list(dict.fromkeys(idx for _, idx in self._auto.iter(metaclip_spacing(caption))))
        text = fold(caption)
        n = len(text)
        found: dict = {}
        lengths = self._lengths
        for end, idx in self._auto.iter(text):
            start = end - lengths[idx] + 1
            if start > 0 and text[start - 1].isalnum():
                continue
            if end + 1 < n and text[end + 1].isalnum():
                continue
            found.setdefault(idx, None)
        return list(found)

    def match(self, caption: str) -> List[str]:
        """The entries found in ``caption`` (see the module doc for the rules)."""
        return [self.entries[i] for i in self.match_ids(caption)]


@functools.lru_cache(maxsize=4)
def _cached_matcher(path: str, mtime_ns: int, size: int, rule: str) -> Matcher:
    return Matcher(read_queries(path), rule)


def matcher_for(path: str, rule: str = DEFAULT_MATCH_RULE) -> Matcher:
    """The Matcher of a query-list file under ``rule``, built once per process (and rebuilt
    if the file changes), so per-shard tasks can take the file's path rather than the
    automaton."""
    check_rule(rule)
    st = os.stat(path) if os.path.exists(path) else None
    if st is None:
        read_queries(path)  # raises the CurateError naming the missing file
    return _cached_matcher(os.path.abspath(path), st.st_mtime_ns, st.st_size, rule)
