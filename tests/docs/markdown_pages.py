"""Reading the documentation's Markdown: which pages, their fenced code blocks, their links
and the anchors their headings get.  Plain text processing, no Markdown library: the pages
use fenced blocks, ATX headings (`#`) and inline links only."""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The languages the example runner executes, and the interpreter each one runs under.
RUN_LANGS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_SKIP = re.compile(r"^\s*<!--\s*example:\s*skip\s*\((.+)\)\s*-->\s*$")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"(`+).+?\1")


def pages() -> List[str]:
    """README.md and docs/*.md, as paths relative to the repository root."""
    found = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return [p.replace(os.sep, "/") for p in found]


def read(page: str) -> List[str]:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read().split("\n")


@dataclass(frozen=True)
class Block:
    page: str          # path relative to the repository root
    line: int          # 1-based line of the opening fence
    lang: str          # the info string's first word, lower-cased ("" when none)
    code: str
    skip: Optional[str]  # the reason of a `<!-- example: skip (reason) -->` on the line before

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> List[Block]:
    """Every fenced code block of ``page``.  An unclosed fence is an error, not a block
    silently left unrun."""
    lines = read(page)
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        close = re.compile(r"^\s*" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        if j == len(lines):
            raise ValueError(f"{page}:{i + 1}: a code fence that is never closed")
        body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1:j]]
        skip = _SKIP.match(lines[i - 1]) if i > 0 else None
        out.append(Block(page, i + 1, lang, "\n".join(body) + "\n", skip.group(1).strip() if skip else None))
        i = j + 1
    return out


def stray_skip_markers(page: str) -> List[int]:
    """Lines of skip markers that are not on the line right before an opening fence."""
    lines = read(page)
    fences = {b.line for b in blocks(page)}
    return [n + 1 for n, ln in enumerate(lines) if _SKIP.match(ln) and (n + 2) not in fences]


def prose_lines(page: str, keep_code_spans: bool = False) -> Iterator[Tuple[int, str]]:
    """(line number, text) of every line outside fenced blocks (fences included), inline code
    spans removed unless ``keep_code_spans`` (a heading's code text is part of its anchor)."""
    inside = set()
    for b in blocks(page):
        inside.update(range(b.line, b.line + b.code.count("\n") + 2))  # fence, body, closing fence
    for n, ln in enumerate(read(page), start=1):
        if n not in inside:
            yield n, ln if keep_code_spans else _INLINE_CODE.sub("", ln)


def links(page: str) -> List[Tuple[int, str]]:
    """(line, target) of every inline link and image of ``page`` outside code."""
    return [(n, m.group(1)) for n, ln in prose_lines(page) for m in _LINK.finditer(ln)]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case; inline-code backticks and every
    character that is not a letter, digit, space, hyphen or underscore dropped; spaces
    become hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: str) -> Set[str]:
    """The anchors of ``page``'s headings, with GitHub's -1, -2 suffixes for repeats."""
    seen, out = {}, set()
    for _, ln in prose_lines(page, keep_code_spans=True):
        m = _HEADING.match(ln)
        if not m:
            continue
        base = slug(m.group(1))
        count = seen.get(base, 0)
        out.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return out
