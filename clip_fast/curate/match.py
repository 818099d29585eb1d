"""Match captions against the query list: lower-cased substrings at word boundaries.

One Aho-Corasick automaton (``pyahocorasick``) holds every entry, so a caption is
scanned once whatever the list's size; Python only loops over the hits it reports.
The automaton reports every occurrence, overlapping ones included ("new york" and
"york" both match "new york city").  A hit is kept when the characters just before and
just after it are not letters or digits (or are the caption's ends), so "cat" matches
"a cat." but not "category".

Captions are normalised like entries (:func:`~clip_fast.curate.queries.normalize_entry`:
lower case, ``_`` as a space, single spaces), so "New_York" and "new  york" match
"new york".
"""
from __future__ import annotations

import functools
import os
from typing import List, Sequence

from .queries import normalize_entry, read_queries


class Matcher:
    """An Aho-Corasick automaton over ``entries``; :meth:`match` returns the entries found."""

    def __init__(self, entries: Sequence[str]):
        import ahocorasick

        index: dict = {}
        for e in entries:
            e = normalize_entry(e)
            if e:
                index.setdefault(e, len(index))
        self.entries: List[str] = list(index)
        auto = ahocorasick.Automaton(ahocorasick.STORE_INTS)
        for e, i in index.items():
            auto.add_word(e, i)
        if not self.entries:
            raise ValueError("Matcher needs at least one non-empty entry")
        auto.make_automaton()
        self._auto = auto
        self._lengths = [len(e) for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def match_ids(self, caption: str) -> List[int]:
        """Indices of the entries found in ``caption``, each once, in order of first end."""
        text = normalize_entry(caption)
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
        """The entries found in ``caption`` (see the module doc for the rule)."""
        return [self.entries[i] for i in self.match_ids(caption)]


@functools.lru_cache(maxsize=2)
def _cached_matcher(path: str, mtime_ns: int, size: int) -> Matcher:
    return Matcher(read_queries(path))


def matcher_for(path: str) -> Matcher:
    """The Matcher of a query-list file, built once per process (and rebuilt if the file
    changes), so per-shard tasks can take the file's path rather than the automaton."""
    st = os.stat(path) if os.path.exists(path) else None
    if st is None:
        read_queries(path)  # raises the CurateError naming the missing file
    return _cached_matcher(os.path.abspath(path), st.st_mtime_ns, st.st_size)
