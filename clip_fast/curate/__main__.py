"""``python -m clip_fast.curate queries|match|balance``: CLIP's data recipe as three commands.

    queries   build the query list (words, numbers, bigrams, titles, WordNet) -> queries.tsv
    match     keep the captions that contain an entry, with the entries they contain
    balance   keep about --max-per-query pairs per head entry; write a report and a PNG

The defaults follow MetaCLIP's released code: synset head names and the numbers 0-99 in
the list, case-sensitive space-delimited matching (--match metaclip), and a pair kept
with probability 1 - prod(1 - min(1, t / count(e))) over its entries (--combine any).
--wordnet lemmas, --match lenient and --combine max select the alternatives.

The balanced output (``OUT/balanced.csv`` for CSV input, ``OUT/*.tar`` for tar shards)
is read by ``python -m clip_fast.train --train-data`` as it is.  The commands need the
``curate`` extra: pip install 'clip-fast[curate]'.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import CurateError
from .shards import Layout

# The curate extra's modules, and the pip package that provides each.
_EXTRA_PACKAGES = {"ahocorasick": "pyahocorasick", "wordfreq": "wordfreq", "wordsegment": "wordsegment",
                   "nltk": "nltk", "numpy": "numpy", "dask": "dask[distributed]",
                   "distributed": "dask[distributed]", "tqdm": "tqdm", "matplotlib": "matplotlib"}


def missing_extra_message(exc: ImportError) -> str | None:
    """The install hint for an ImportError of one of the curate extra's modules, else None."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if name not in _EXTRA_PACKAGES:
        return None
    return (f"needs the module {name!r} (package {_EXTRA_PACKAGES[name]}), which comes with "
            f"the curate extra: pip install 'clip-fast[curate]'")


def _add_layout(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("caption shards (CSV columns as the trainer's flags)")
    g.add_argument("--csv-caption-key", default="title")
    g.add_argument("--csv-img-key", default="filepath")
    g.add_argument("--csv-separator", default="\t")
    g.add_argument("--tar-caption-ext", default="txt", help="tar member holding the caption")
    g.add_argument("--dask", default=None, metavar="ADDRESS",
                   help="run the per-shard passes on a Dask cluster: a scheduler address "
                        "(tcp://host:8786) or 'local' for a LocalCluster on this machine")


def _require(args) -> None:
    """Raise the curate extra's install hint, before any work, when a module this command
    will import is missing."""
    import importlib.util

    if args.command == "queries":
        needed = [m for m, on in (("wordfreq", args.words == "wordfreq"),
                                  ("wordsegment", args.bigrams == "wordsegment"),
                                  ("nltk", not args.no_wordnet)) if on]
    elif args.command == "match":
        needed = ["ahocorasick"]
    else:
        needed = ["numpy"] + ([] if args.no_plot else ["matplotlib"])
    if args.command != "queries":
        needed.append("tqdm" if args.dask is None else "dask")
    for name in needed:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def _layout(args) -> Layout:
    return Layout(args.csv_separator, args.csv_caption_key, args.csv_img_key, args.tar_caption_ext)


def build_parser() -> argparse.ArgumentParser:
    # Long as the flag list is: one add_argument per flag of the three subcommands.
    from .match import DEFAULT_MATCH_RULE, MATCH_RULES
    from .pipeline import COMBINE_RULES, DEFAULT_COMBINE, DEFAULT_MAX_PER_QUERY
    from .queries import (DEFAULT_CORPUS_WORDS, DEFAULT_MIN_COUNT, DEFAULT_PMI_THRESHOLDS,
                          DEFAULT_TITLE_MIN_VOLUME, DEFAULT_WORDNET_DIR, WORDNET_NAMES)

    ap = argparse.ArgumentParser(prog="python -m clip_fast.curate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("queries", help="build the query list")
    q.add_argument("--out", required=True, help="query list to write (TSV: entry, source, evidence)")
    q.add_argument("--words", choices=("wordfreq", "corpus", "counts", "off"), default="wordfreq",
                   help="where word counts come from (default: wordfreq's English list)")
    q.add_argument("--min-count", type=int, default=DEFAULT_MIN_COUNT)
    q.add_argument("--corpus-words", type=float, default=DEFAULT_CORPUS_WORDS,
                   help="corpus size for wordfreq: count = round(frequency * this) "
                        "(default 4e9, about English Wikipedia)")
    q.add_argument("--corpus", default=None, help="UTF-8 text corpus for --words/--bigrams corpus")
    q.add_argument("--word-counts", default=None, help="word<TAB>count file for --words counts")
    q.add_argument("--bigrams", choices=("wordsegment", "corpus", "off"), default="wordsegment")
    q.add_argument("--no-numbers", action="store_true", help="leave out the numbers 0 to 99")
    q.add_argument("--pmi-threshold", type=float, default=None,
                   help=f"keep bigrams with NLTK's PMI (bits) >= this (default when "
                        f"--bigram-top-k is not given: {DEFAULT_PMI_THRESHOLDS['corpus']:g} for "
                        f"--bigrams corpus, as MetaCLIP; {DEFAULT_PMI_THRESHOLDS['wordsegment']:g} "
                        f"for wordsegment, whose pairs all score below 24)")
    q.add_argument("--bigram-top-k", type=int, default=None, help="keep the K bigrams of highest PMI")
    q.add_argument("--bigram-min-count", type=float, default=1, help="ignore rarer bigrams")
    q.add_argument("--titles", default=None, help="titles file: title[<TAB>volume] per line")
    q.add_argument("--title-min-volume", type=float, default=DEFAULT_TITLE_MIN_VOLUME,
                   help=f"keep titles with volume >= this when the file has a volume column "
                        f"(default {DEFAULT_TITLE_MIN_VOLUME:g}, MetaCLIP's summed page views)")
    q.add_argument("--wordnet-dir", default=DEFAULT_WORDNET_DIR,
                   help="WordNet 3.0 database files (Debian: apt-get install wordnet-base)")
    q.add_argument("--wordnet", choices=WORDNET_NAMES, default="synsets",
                   help="synsets: one head name per synset, as MetaCLIP (default); "
                        "lemmas: every lemma name of every synset")
    q.add_argument("--no-wordnet", action="store_true", help="switch the WordNet source off")

    m = sub.add_parser("match", help="match captions against the query list")
    m.add_argument("--queries", required=True)
    m.add_argument("--input", required=True,
                   help="caption shards: a.csv::b.csv, x-{000..009}.tar or a folder")
    m.add_argument("--out", required=True, help="folder for the matched shards (same names)")
    m.add_argument("--match", choices=MATCH_RULES, default=DEFAULT_MATCH_RULE,
                   help="metaclip: MetaCLIP's case-sensitive ' entry ' rule (default); "
                        "lenient: case-folded, any non-alphanumeric boundary")
    _add_layout(m)

    b = sub.add_parser("balance", help="cap the pairs per head entry (MetaCLIP's rule)")
    b.add_argument("--input", required=True, help="matched shards (the output of match)")
    b.add_argument("--out", required=True, help="folder for the balanced shards and the report")
    b.add_argument("--max-per-query", type=int, default=DEFAULT_MAX_PER_QUERY, help="t")
    b.add_argument("--combine", choices=COMBINE_RULES, default=DEFAULT_COMBINE,
                   help="any: keep a pair with 1 - prod(1 - p_e), MetaCLIP's (default); "
                        "max: with max p_e")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-plot", action="store_true", help="skip report.png")
    _add_layout(b)
    return ap


def _mapper(args, desc):
    """(mapper or None for the local default, a function that releases it or None)."""
    from .pipeline import dask_mapper

    if args.dask is None:
        return None, None  # each pass then runs here with its own progress bar
    from dask.distributed import Client, LocalCluster

    if args.dask != "local":
        client = Client(args.dask)
        return dask_mapper(client, progress=True), client.close
    cluster = LocalCluster(processes=False, dashboard_address=None)
    client = Client(cluster)

    def close():
        client.close()
        cluster.close()

    return dask_mapper(client, progress=True), close


def _queries(args) -> None:
    from .queries import QueryOptions, build_queries, write_queries

    if args.min_count < 0:
        raise CurateError(f"--min-count must be >= 0, got {args.min_count}")
    opt = QueryOptions(
        words=None if args.words == "off" else args.words, min_count=args.min_count,
        corpus_words=int(args.corpus_words), corpus=args.corpus, word_counts=args.word_counts,
        bigrams=None if args.bigrams == "off" else args.bigrams,
        pmi_threshold=args.pmi_threshold, bigram_top_k=args.bigram_top_k,
        bigram_min_count=args.bigram_min_count, titles=args.titles,
        title_min_volume=args.title_min_volume, numbers=not args.no_numbers,
        wordnet=None if args.no_wordnet else args.wordnet_dir, wordnet_names=args.wordnet)
    rows = build_queries(opt, log=lambda s: print(s, file=sys.stderr))
    write_queries(rows, args.out)
    print(f"queries: wrote {len(rows)} entries to {args.out}")


def _match(args) -> None:
    from .pipeline import run_match

    mapper, close = _mapper(args, "match")
    try:
        r = run_match(args.input, args.queries, args.out, _layout(args), mapper, args.match)
    finally:
        if close is not None:
            close()
    print(f"match ({args.match}): {r['read']} captions in {r['shards']} shards, {r['kept']} matched "
          f"({r['read'] - r['kept']} without a match dropped) -> {args.out}")


def _balance(args) -> None:
    from .pipeline import run_balance, write_report

    mapper, close = _mapper(args, "balance")
    try:
        res = run_balance(args.input, args.out, args.max_per_query, args.seed,
                          _layout(args), mapper, combine=args.combine)
    finally:
        if close is not None:
            close()
    report = os.path.join(args.out, "report.csv")
    png = None if args.no_plot else os.path.join(args.out, "report.png")
    write_report(res, args.max_per_query, report, png)
    dest = res.outputs[0] if res.outputs[0].endswith(".csv") else args.out
    print(f"balance: kept {res.kept} of {res.read} pairs over {len(res.counts)} entries "
          f"(t={args.max_per_query}, combine={args.combine}, seed={args.seed}) -> {dest}; "
          f"report {report}" + ("" if png is None else f", {png}"))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _require(args)
        {"queries": _queries, "match": _match, "balance": _balance}[args.command](args)
    except CurateError as exc:
        print(f"curate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        # A module of the curate extra is missing: name the extra rather than show the
        # traceback.  Any other ImportError is a fault and propagates.
        hint = missing_extra_message(exc)
        if hint is None:
            raise
        print(f"curate {args.command}: error: {hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
