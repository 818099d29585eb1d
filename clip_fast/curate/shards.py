"""Read and write caption shards: the trainer's CSV format and webdataset tar shards.

* CSV: a header and one row per pair, separated by ``separator`` (tab by default, as
  ``--csv-separator`` in the trainer), with an image-path column (``img_key``) and a
  caption column (``caption_key``).  Relative image paths are resolved against the
  CSV's folder, and rewritten relative to the output's folder, so an output CSV can be
  passed to ``python -m clip_fast.train --train-data`` as it is.  Matches are stored in
  a ``matches`` column as a JSON list.
* tar: webdataset samples, the members ``<key>.<ext>`` of one sample adjacent in the
  archive (webdataset's rule); the caption is ``<key>.txt`` and the matches are
  ``<key>.matches.json``.  Every member of a kept sample is copied.

:func:`filter_shard` is the one loop both formats share: it reads a shard, asks a
``decide`` function per record, and writes the records it keeps.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

from .errors import CurateError, require_file, where

MATCHES_COLUMN = "matches"
MATCHES_EXT = "matches.json"
_CSV_EXTS = (".csv", ".tsv")
_TAR_EXTS = (".tar", ".tar.gz", ".tgz")
_MAX_MEMBER_BYTES = 64 << 20
# Caption fields can be long; the csv module's default limit (128 KiB) stays, raised
# to 16 MiB so one long field is read rather than reported as malformed.
csv.field_size_limit(16 << 20)


@dataclass(frozen=True)
class Layout:
    """Where the captions are: the CSV columns (defaults as the trainer's ``--csv-*``
    flags) and the tar member extension."""

    separator: str = "\t"
    caption_key: str = "title"
    img_key: str = "filepath"
    tar_caption_ext: str = "txt"


def shard_format(path: str) -> str:
    """'csv' or 'tar', from the file name."""
    low = path.lower()
    if low.endswith(_CSV_EXTS):
        return "csv"
    if low.endswith(_TAR_EXTS):
        return "tar"
    raise CurateError(f"{path}: not a caption shard (expected {'/'.join(_CSV_EXTS + _TAR_EXTS)})")


def expand_inputs(spec: str) -> List[str]:
    """Expand an input spec: ``a.csv::b.csv``, ``x-{000..009}.tar``, or a folder (all its
    CSV/TSV or tar files, sorted).  All shards must be of one format."""
    out: List[str] = []
    for part in spec.split("::"):
        m = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if m:
            lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
            out += [part[:m.start()] + str(i).zfill(width) + part[m.end():] for i in range(lo, hi + 1)]
        elif os.path.isdir(part):
            out += sorted(os.path.join(part, f) for f in os.listdir(part)
                          if f.lower().endswith(_CSV_EXTS + _TAR_EXTS))
        elif part:
            out.append(part)
    if not out:
        raise CurateError(f"{spec!r}: no caption shards found")
    for p in out:
        require_file(p, "caption shard")
    formats = {shard_format(p) for p in out}
    if len(formats) > 1:
        raise CurateError(f"{spec!r}: mixes CSV and tar shards")
    names = [os.path.basename(p) for p in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CurateError(f"{spec!r}: shards share the file names {dup}; outputs are named "
                          f"after their input, so names must be unique")
    return out


# ------------------------------------------------------------------------------ CSV


def _rebase(path_value: str, src_dir: str, out_dir: str) -> str:
    if not path_value or os.path.isabs(path_value):
        return path_value
    return os.path.relpath(os.path.join(src_dir, path_value), out_dir)


def _parse_matches(raw: Optional[str], place: str) -> List[str]:
    try:
        val = json.loads(raw) if raw else None
    except json.JSONDecodeError as exc:
        raise CurateError(f"{place}: the {MATCHES_COLUMN} field is not JSON ({exc.msg})") from exc
    if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
        raise CurateError(f"{place}: the {MATCHES_COLUMN} field must be a JSON list of "
                          f"strings; run `python -m clip_fast.curate match` first")
    return val


Decide = Callable[[int, str, Optional[List[str]]], Optional[List[str]]]


def _filter_csv(path: str, out_path: Optional[str], layout: Layout, decide: Decide,
                want_matches: bool, out_base: Optional[str]) -> Tuple[int, int]:
    n_in = n_out = 0
    src_dir = os.path.dirname(os.path.abspath(path))
    base = os.path.abspath(out_base or os.path.dirname(os.path.abspath(out_path or path)))
    out_fh = writer = None
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter=layout.separator)
            try:
                fields = reader.fieldnames
            except csv.Error as exc:
                raise CurateError(f"{where(path, 1)}: malformed CSV header: {exc}") from exc
            if not fields:
                raise CurateError(f"{path}: empty file (no CSV header)")
            needed = [(layout.caption_key, "--csv-caption-key")]
            if want_matches:
                needed.append((MATCHES_COLUMN, "written by `curate match`"))
            for key, flag in needed:
                if key not in fields:
                    raise CurateError(f"{where(path, 1)}: no column {key!r} ({flag}); the header "
                                      f"has {fields} with separator {layout.separator!r} "
                                      f"(--csv-separator)")
            out_fields = list(fields) + ([] if MATCHES_COLUMN in fields else [MATCHES_COLUMN])
            if out_path is not None:
                out_fh = open(out_path, "w", newline="", encoding="utf-8")
                writer = csv.DictWriter(out_fh, fieldnames=out_fields, delimiter=layout.separator,
                                        lineterminator="\n")
                writer.writeheader()
            rebase = layout.img_key in fields
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    raise CurateError(f"{where(path, reader.line_num)}: malformed CSV: {exc}") from exc
                place = where(path, reader.line_num)
                extra = row.pop(None, None)  # DictReader files surplus fields under None
                if extra is not None or any(v is None for v in row.values()):
                    got = len(fields) + len(extra) if extra else sum(v is not None for v in row.values())
                    raise CurateError(f"{place}: expected {len(fields)} fields, got {got}")
                matches = _parse_matches(row.get(MATCHES_COLUMN), place) if want_matches else None
                keep = decide(n_in, row[layout.caption_key], matches)
                n_in += 1
                if keep is None:
                    continue
                n_out += 1
                if writer is not None:
                    row[MATCHES_COLUMN] = json.dumps(keep, ensure_ascii=False)
                    if rebase:
                        row[layout.img_key] = _rebase(row[layout.img_key], src_dir, base)
                    writer.writerow(row)
    except UnicodeDecodeError as exc:
        raise CurateError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    finally:
        if out_fh is not None:
            out_fh.close()
    return n_in, n_out


# ------------------------------------------------------------------------------ tar


def _tar_samples(path: str) -> Iterator[Tuple[str, List[Tuple[tarfile.TarInfo, bytes]]]]:
    """``(key, [(member, data), ...])`` per sample, streaming; adjacent members share a key."""
    key, group = None, []
    try:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                d, name = os.path.split(m.name)
                if "." not in name:
                    continue
                if m.size > _MAX_MEMBER_BYTES:
                    raise CurateError(f"{path}:{m.name}: member larger than {_MAX_MEMBER_BYTES} bytes")
                k = os.path.join(d, name.split(".", 1)[0])
                if k != key and group:
                    yield key, group
                    group = []
                key = k
                fh = tf.extractfile(m)
                group.append((m, fh.read() if fh is not None else b""))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CurateError(f"{path}: cannot read tar shard: {exc}") from exc
    if group:
        yield key, group


def _filter_tar(path: str, out_path: Optional[str], layout: Layout, decide: Decide,
                want_matches: bool) -> Tuple[int, int]:
    n_in = n_out = 0
    out = tarfile.open(out_path, "w", format=tarfile.PAX_FORMAT) if out_path else None
    cap_ext = layout.tar_caption_ext.lower()
    try:
        for key, group in _tar_samples(path):
            by_ext = {m.name.rsplit("/", 1)[-1].split(".", 1)[1].lower(): data for m, data in group}
            place = f"{path}:{key}"
            if cap_ext not in by_ext:
                continue  # no caption: nothing to match
            try:
                caption = by_ext[cap_ext].decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise CurateError(f"{place}.{cap_ext}: caption is not UTF-8 ({exc.reason})") from exc
            matches = None
            if want_matches:
                if MATCHES_EXT not in by_ext:
                    raise CurateError(f"{place}: no {MATCHES_EXT} member; run "
                                      f"`python -m clip_fast.curate match` first")
                matches = _parse_matches(by_ext[MATCHES_EXT].decode("utf-8", "replace"),
                                         f"{place}.{MATCHES_EXT}")
            keep = decide(n_in, caption, matches)
            n_in += 1
            if keep is None:
                continue
            n_out += 1
            if out is not None:
                for m, data in group:
                    if m.name.endswith("." + MATCHES_EXT):
                        continue
                    info = tarfile.TarInfo(m.name)
                    info.size, info.mtime, info.mode = len(data), m.mtime, m.mode
                    out.addfile(info, io.BytesIO(data))
                payload = json.dumps(keep, ensure_ascii=False).encode("utf-8")
                info = tarfile.TarInfo(f"{key}.{MATCHES_EXT}")
                info.size, info.mtime, info.mode = len(payload), group[0][0].mtime, 0o644
                out.addfile(info, io.BytesIO(payload))
    finally:
        if out is not None:
            out.close()
    return n_in, n_out


def filter_shard(path: str, out_path: Optional[str], layout: Layout, decide: Decide,
                 want_matches: bool, out_base: Optional[str] = None) -> Tuple[int, int]:
    """Read the records of one shard in order and keep those ``decide`` accepts.

    ``decide(ordinal, caption, matches)`` returns the record's matches to write, or None
    to drop it; ``matches`` is the stored list when ``want_matches`` (else None).  With
    ``out_path`` the kept records go to a shard of the same format (CSV image paths
    relative to ``out_base``, default the output's folder).  Returns (records read,
    records kept).
    """
    require_file(path, "caption shard")
    if shard_format(path) == "csv":
        return _filter_csv(path, out_path, layout, decide, want_matches, out_base)
    return _filter_tar(path, out_path, layout, decide, want_matches)


def concat_csv(parts: List[str], out_path: str, separator: str) -> int:
    """Concatenate CSV shards that share a header into one file; returns the row count."""
    rows = 0
    header = None
    with open(out_path, "w", newline="", encoding="utf-8") as out:
        w = csv.writer(out, delimiter=separator, lineterminator="\n")
        for p in parts:
            with open(p, newline="", encoding="utf-8") as fh:
                r = csv.reader(fh, delimiter=separator)
                h = next(r, None)
                if header is None:
                    header = h
                    w.writerow(h)
                elif h != header:
                    raise CurateError(f"{where(p, 1)}: header {h} differs from {parts[0]}'s {header}")
                for row in r:
                    w.writerow(row)
                    rows += 1
    return rows

