"""Build the query list: the union of words, numbers, bigrams, titles and WordNet names.

CLIP's WIT-400M searched for pairs whose text contains one of about 500K queries built
from four sources (Radford et al., 2021, section 2.2); MetaCLIP (Xu et al., 2023)
rebuilt that list and calls it metadata.  Each source here can be switched off, and an
entry is credited to the first source, in the order below, that produced it:

1. ``words``: every word whose count in a reference corpus is at least ``min_count``.
   The offline default is ``wordfreq``'s English list, whose frequencies are converted
   to counts for a stated corpus size (see :func:`wordfreq_counts`).  A user's own
   corpus (plain text) or word-count file replaces it.
2. ``numbers``: the numbers 0 to 99, which MetaCLIP's ``build_metadata.py`` adds to its
   unigrams.
3. ``bigrams``: adjacent word pairs with a high pointwise mutual information (NLTK's
   PMI, see :func:`pmi`), from ``wordsegment``'s shipped unigram and bigram tables or
   from a user's corpus; kept above a threshold or as the top K.
4. ``titles``: lines of a user's titles file (Wikipedia article names), optionally with
   a volume column (MetaCLIP: page views summed over its pageview days) and a minimum
   volume.
5. ``wordnet``: one name per synset of WordNet 3.0, read from Debian's ``wordnet-base``
   files (``/usr/share/wordnet``) by nltk's ``WordNetCorpusReader``; nothing is
   downloaded.  By default the synset's head name, as MetaCLIP takes it (see
   :func:`wordnet_entries`); ``names="lemmas"`` takes every lemma name instead.

Entries keep their case (MetaCLIP's matching is case-sensitive); :func:`normalize_entry`
only reads ``_`` as a space and collapses runs of whitespace.  As in MetaCLIP, an entry
that is a single punctuation character is dropped.

The output is a tab-separated file with the header ``entry, source, evidence``; the
evidence says why the source kept the entry (``count=…``, ``pmi=…``, ``volume=…``,
``synset=…``).
"""
from __future__ import annotations

import csv
import io
import math
import re
import string
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from .errors import CurateError, require_file, where

SOURCES = ("words", "numbers", "bigrams", "titles", "wordnet")
WORDNET_NAMES = ("synsets", "lemmas")
QUERY_HEADER = ("entry", "source", "evidence")

# wordfreq gives frequencies, not counts.  A count is frequency * corpus size; the default
# size is 4e9 words, the order of English Wikipedia's article text, so that
# ``min_count=100`` keeps words with a frequency of at least 2.5e-8 (Zipf 1.4), close to
# CLIP's "every word occurring at least 100 times in English Wikipedia".  wordfreq blends
# several sources besides Wikipedia and stores frequencies in 0.01-Zipf bins, so these
# counts are estimates; pass a corpus or a word-count file for exact ones.
DEFAULT_CORPUS_WORDS = 4_000_000_000
DEFAULT_MIN_COUNT = 100
DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
# MetaCLIP's title cut: at least 70 page views summed over its pageview days.  Applied to
# titles files that carry a volume column; a file without one is taken whole.
DEFAULT_TITLE_MIN_VOLUME = 70.0
# MetaCLIP drops entries that are one punctuation character.
_FORBIDDEN = frozenset(string.punctuation)

# Corpus tokens: runs of letters and digits, joined across inner apostrophes ("don't").
_TOKEN_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def normalize_entry(text: str) -> str:
    """``_`` read as a space, runs of whitespace collapsed to one space; case is kept."""
    return " ".join(text.replace("_", " ").split())


def tokenize(line: str) -> List[str]:
    """The corpus tokenizer: lower-cased runs of letters/digits, with inner apostrophes.

    Tokens are lower-cased so that a sentence-initial "The" counts as "the"; a corpus's
    words therefore give lower-case entries.  A word-count file keeps its case."""
    return _TOKEN_RE.findall(line.lower())


# ----------------------------------------------------------------------------- counts


@dataclass
class CorpusCounts:
    """Unigram and adjacent-bigram counts of a corpus.

    ``n_tokens`` is the number of tokens and ``n_bigrams`` the number of adjacent pairs
    (pairs do not cross line breaks).
    """

    unigrams: Dict[str, float]
    bigrams: Dict[Tuple[str, str], float]
    n_tokens: float
    n_bigrams: float


def corpus_counts(path: str) -> CorpusCounts:
    """Count the tokens and within-line adjacent token pairs of a UTF-8 text file."""
    require_file(path, "corpus")
    uni: Counter = Counter()
    bi: Counter = Counter()
    line_no = 0
    try:
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                toks = tokenize(line)
                uni.update(toks)
                bi.update(zip(toks, toks[1:]))
    except UnicodeDecodeError as exc:
        raise CurateError(f"{where(path, line_no + 1)}: corpus is not UTF-8 text ({exc.reason})") from exc
    n_tok = sum(uni.values())
    if n_tok == 0:
        raise CurateError(f"{path}: corpus holds no words")
    return CorpusCounts(dict(uni), dict(bi), float(n_tok), float(sum(bi.values())))


def _tsv_lines(path: str, what: str):
    """(line number, line, tab-separated fields) of each non-blank line of a UTF-8 ``what`` file."""
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if line.strip():
                    yield line_no, line, line.rstrip("\r\n").split("\t")
    except UnicodeDecodeError as exc:
        raise CurateError(f"{path}: {what} file is not UTF-8 text ({exc.reason})") from exc


def read_word_counts(path: str) -> Dict[str, int]:
    """Read a word-count file: one ``word<TAB>count`` per line (blank lines skipped).

    Counts are non-negative integers; words are normalised (case kept) and the counts of
    words that normalise alike are added.
    """
    out: Counter = Counter()
    for line_no, line, parts in _tsv_lines(path, "word-count"):
        if len(parts) != 2:
            raise CurateError(f"{where(path, line_no)}: expected 'word<TAB>count', "
                              f"got {len(parts)} tab-separated fields: {line.rstrip()!r}")
        word, raw = normalize_entry(parts[0]), parts[1].strip()
        if not word:
            raise CurateError(f"{where(path, line_no)}: empty word")
        if not raw.isdigit():
            raise CurateError(f"{where(path, line_no)}: count {raw!r} is not a "
                              f"non-negative integer")
        out[word] += int(raw)
    if not out:
        raise CurateError(f"{path}: word-count file holds no entries")
    return dict(out)


def wordfreq_counts(corpus_words: int = DEFAULT_CORPUS_WORDS, wordlist: str = "large") -> Dict[str, int]:
    """English word counts estimated from ``wordfreq``: ``round(frequency * corpus_words)``.

    Only tokens holding at least one letter are kept (wordfreq also lists numbers and
    punctuation).
    """
    import wordfreq

    if corpus_words <= 0:
        raise ValueError(f"corpus_words must be > 0, got {corpus_words}")
    freqs = wordfreq.get_frequency_dict("en", wordlist=wordlist)
    return {w: int(round(f * corpus_words)) for w, f in freqs.items()
            if any(c.isalpha() for c in w)}


def wordsegment_counts() -> CorpusCounts:
    """``wordsegment``'s shipped tables: ~333K unigrams and ~250K bigrams (Google's web
    trillion-word corpus, Norvig's "Natural Language Corpus Data").

    The tables give no bigram total; ``n_bigrams`` is set to the token total
    ``wordsegment.TOTAL`` (PMI itself uses only the token total).
    """
    import wordsegment

    seg = wordsegment.Segmenter()
    seg.load()
    bigrams = {}
    for key, c in seg.bigrams.items():
        a, _, b = key.partition(" ")
        if a and b:
            bigrams[(a, b)] = c
    return CorpusCounts(dict(seg.unigrams), bigrams, float(seg.total), float(seg.total))


# ------------------------------------------------------------------------------- PMI


def pmi(c_xy: float, c_x: float, c_y: float, n_tokens: float) -> float:
    """Pointwise mutual information in bits of the pair ``x y``, as NLTK's
    ``BigramAssocMeasures.pmi`` (the measure MetaCLIP's bigrams use).

    PMI = log2( c_xy * n_tokens / (c_x * c_y) ), i.e. log2( p(x y) / (p(x) p(y)) ) with
    every probability taken over the token total.
    """
    return math.log2(c_xy * n_tokens / (c_x * c_y))


def bigram_pmis(counts: CorpusCounts, min_count: float = 1) -> Dict[Tuple[str, str], float]:
    """PMI of every bigram seen at least ``min_count`` times whose two words have counts.

    Rare pairs get the highest PMI (a pair seen once, of two words seen once each, has
    the maximum), so a minimum count is the usual guard.
    """
    out = {}
    uni = counts.unigrams
    for (a, b), c in counts.bigrams.items():
        if c < min_count or a not in uni or b not in uni:
            continue
        out[(a, b)] = pmi(c, uni[a], uni[b], counts.n_tokens)
    return out


def select_bigrams(pmis: Dict[Tuple[str, str], float], threshold: Optional[float] = None,
                   top_k: Optional[int] = None) -> List[Tuple[str, float]]:
    """Bigrams with PMI >= ``threshold`` and/or the ``top_k`` highest, as ``("x y", pmi)``,
    highest PMI first (ties broken by the text, so the order is reproducible)."""
    if threshold is None and top_k is None:
        raise ValueError("select_bigrams needs a PMI threshold or a top K")
    ranked = sorted(pmis.items(), key=lambda kv: (-kv[1], kv[0]))
    if threshold is not None:
        ranked = [kv for kv in ranked if kv[1] >= threshold]
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        ranked = ranked[:top_k]
    return [(f"{a} {b}", v) for (a, b), v in ranked]


# ---------------------------------------------------------------------------- titles


def read_titles(path: str, min_volume: Optional[float] = None,
                require_volume: bool = True) -> List[Tuple[str, Optional[float]]]:
    """Read a titles file: one title per line, optionally ``<TAB>volume``.

    Lines that carry a volume must all carry one (a number >= 0).  With ``min_volume``,
    only titles whose volume is at least that are kept; every line then needs a volume,
    unless ``require_volume`` is False, in which case a file without volumes is kept
    whole (the query builder's default cut applies only to files that have volumes).
    Titles are normalised (Wikipedia's ``_`` becomes a space); blank lines are skipped.
    """
    out: List[Tuple[str, Optional[float]]] = []
    has_volume = None
    for line_no, _line, parts in _tsv_lines(path, "titles"):
        if len(parts) > 2:
            raise CurateError(f"{where(path, line_no)}: expected 'title' or "
                              f"'title<TAB>volume', got {len(parts)} fields")
        title = normalize_entry(parts[0])
        if not title:
            raise CurateError(f"{where(path, line_no)}: empty title")
        volume = None
        if len(parts) == 2:
            try:
                volume = float(parts[1])
            except ValueError:
                volume = -1.0
            if not volume >= 0 or math.isinf(volume):
                raise CurateError(f"{where(path, line_no)}: volume {parts[1]!r} is not "
                                  f"a finite number >= 0")
        this_has = volume is not None
        if has_volume is None:
            has_volume = this_has
        elif this_has != has_volume:
            raise CurateError(f"{where(path, line_no)}: "
                              + ("this line has a volume column but earlier lines do not"
                                 if this_has else "no volume column, but earlier lines have one"))
        if min_volume is not None and volume is None and require_volume:
            raise CurateError(f"{where(path, line_no)}: a minimum volume was "
                              f"given but this line has no volume column")
        if min_volume is not None and volume is not None and volume < min_volume:
            continue
        out.append((title, volume))
    return out


# --------------------------------------------------------------------------- WordNet

# The 45 lexicographer file names of WordNet 3.0, in index order, as listed in
# lexnames(5WN).  nltk's reader opens a ``lexnames`` file that Debian's wordnet-base does
# not ship; it only needs it for Synset.lexname().
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food "
    "noun.group noun.location noun.motive noun.object noun.person noun.phenomenon "
    "noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition "
    "verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative "
    "verb.weather adj.ppl"
).split()
_WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv",
                  "index.noun", "index.verb", "index.adj", "index.adv")


def wordnet_reader(root: str = DEFAULT_WORDNET_DIR):
    """nltk's ``WordNetCorpusReader`` over the WordNet database files in ``root``."""
    import os

    missing = [f for f in _WORDNET_FILES if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise CurateError(
            f"{root}: WordNet database files missing ({', '.join(missing)}); install them "
            f"with `apt-get install wordnet-base` (Debian/Ubuntu) or pass the folder that "
            f"holds WordNet 3.0's dict files, or switch the source off (--no-wordnet)")
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    # Recent nltk releases read only below the folders on nltk.data.path; adding the
    # WordNet folder there is nltk's own way to authorise it.
    if os.path.abspath(root) not in map(os.path.abspath, nltk.data.path):
        nltk.data.path.append(os.path.abspath(root))

    class _Reader(WordNetCorpusReader):
        def open(self, fileid):
            if fileid == "lexnames" and not os.path.isfile(os.path.join(root, "lexnames")):
                return io.StringIO("".join(f"{i:02d}\t{n}\t{i}\n" for i, n in enumerate(_LEXNAMES)))
            return super().open(fileid)

        def map_wn(self, version="wordnet"):
            # The mapping to nltk's own WordNet download serves the multilingual data
            # only; reading English from these files needs no mapping.
            return None

    with warnings.catch_warnings():
        # "The multilingual functions are not available": only English is read here.
        warnings.simplefilter("ignore")
        return _Reader(root, None)


def synset_head_name(synset_name: str) -> str:
    """MetaCLIP's name for a synset: nltk's synset name (``dog.n.01``, built from the
    synset's first lemma, lower-cased) up to its first ``.``, ``_`` read as a space.

    Cutting at the first ``.`` shortens names that hold one ("st._louis.n.01" gives
    "st", ".22_caliber.n.01" gives ""), as MetaCLIP's ``build_metadata.py`` does; empty
    names are dropped by the query list."""
    return normalize_entry(synset_name[:synset_name.find(".")])


def wordnet_entries(root: str = DEFAULT_WORDNET_DIR, names: str = "synsets") -> Iterator[Tuple[str, str]]:
    """``(name, synset name)`` per synset (``names="synsets"``: its head name, see
    :func:`synset_head_name`) or per lemma of every synset (``names="lemmas"``), synsets
    in file order."""
    if names not in WORDNET_NAMES:
        raise CurateError(f"wordnet names must be one of {', '.join(WORDNET_NAMES)}; got {names!r}")
    reader = wordnet_reader(root)
    for synset in reader.all_synsets():
        if names == "synsets":
            yield synset_head_name(synset.name()), synset.name()
        else:
            for name in synset.lemma_names():
                yield normalize_entry(name), synset.name()


# ----------------------------------------------------------------------------- union


@dataclass
class QueryOptions:
    """Which sources to use and how.  ``words``/``bigrams`` name where counts come from."""

    words: Optional[str] = "wordfreq"       # "wordfreq" | "corpus" | "counts" | None (off)
    numbers: bool = True                    # the numbers 0 to 99
    min_count: int = DEFAULT_MIN_COUNT
    corpus_words: int = DEFAULT_CORPUS_WORDS
    corpus: Optional[str] = None            # plain text, for words="corpus"/bigrams="corpus"
    word_counts: Optional[str] = None       # word<TAB>count file, for words="counts"
    bigrams: Optional[str] = "wordsegment"  # "wordsegment" | "corpus" | None (off)
    pmi_threshold: Optional[float] = None
    bigram_top_k: Optional[int] = None
    bigram_min_count: float = 1
    titles: Optional[str] = None            # titles file; None switches the source off
    title_min_volume: Optional[float] = DEFAULT_TITLE_MIN_VOLUME  # if the file has volumes
    wordnet: Optional[str] = DEFAULT_WORDNET_DIR  # folder of the WordNet files; None = off
    wordnet_names: str = "synsets"          # "synsets" (head names) | "lemmas"


# Default bigram selection, per source.  MetaCLIP keeps Wikipedia bigrams of NLTK PMI
# >= 30 bits; that is the default for a user's corpus.  wordsegment's pairs all have
# PMI < 24 bits (their unigram table stops at count 12,711, so no pair is rare enough),
# so 30 would keep none; its default is 8 bits, a pair 256x more frequent than chance.
DEFAULT_PMI_THRESHOLDS = {"wordsegment": 8.0, "corpus": 30.0}
DEFAULT_PMI_THRESHOLD = DEFAULT_PMI_THRESHOLDS["wordsegment"]


def build_queries(opt: QueryOptions, log=print) -> List[Tuple[str, str, str]]:
    """The query list as ``(entry, source, evidence)`` rows, sources in the order of SOURCES."""
    rows: List[Tuple[str, str, str]] = []
    seen: set = set()

    def add(items: Iterable[Tuple[str, str]], source: str) -> None:
        before = len(rows)
        for entry, evidence in items:
            if entry and entry not in seen and entry not in _FORBIDDEN:
                seen.add(entry)
                rows.append((entry, source, evidence))
        log(f"queries: {source}: {len(rows) - before} new entries")

    corpus = None
    if opt.corpus is not None and "corpus" in (opt.words, opt.bigrams):
        corpus = corpus_counts(opt.corpus)
    if opt.words is not None:
        if opt.words == "wordfreq":
            counts = wordfreq_counts(opt.corpus_words)
        elif opt.words == "corpus":
            if corpus is None:
                raise CurateError("words from a corpus need a corpus file (--corpus)")
            counts = corpus.unigrams
        elif opt.words == "counts":
            if opt.word_counts is None:
                raise CurateError("words from counts need a word-count file (--word-counts)")
            counts = read_word_counts(opt.word_counts)
        else:
            raise ValueError(f"unknown words source {opt.words!r}")
        kept = sorted(((w, c) for w, c in counts.items() if c >= opt.min_count),
                      key=lambda wc: (-wc[1], wc[0]))
        add(((normalize_entry(w), f"count={int(c)}") for w, c in kept), "words")
    if opt.numbers:
        add(((str(i), "") for i in range(100)), "numbers")
    if opt.bigrams is not None:
        if opt.bigrams == "wordsegment":
            bcounts = wordsegment_counts()
        elif opt.bigrams == "corpus":
            if corpus is None:
                raise CurateError("bigrams from a corpus need a corpus file (--corpus)")
            bcounts = corpus
        else:
            raise ValueError(f"unknown bigrams source {opt.bigrams!r}")
        thr, k = opt.pmi_threshold, opt.bigram_top_k
        if thr is None and k is None:
            thr = DEFAULT_PMI_THRESHOLDS[opt.bigrams]
        chosen = select_bigrams(bigram_pmis(bcounts, opt.bigram_min_count), thr, k)
        add(((normalize_entry(b), f"pmi={v:.4f}") for b, v in chosen), "bigrams")
    if opt.titles is not None:
        titles = read_titles(opt.titles, opt.title_min_volume, require_volume=False)
        add(((t, "" if v is None else f"volume={v:g}") for t, v in titles), "titles")
    if opt.wordnet is not None:
        add(((e, f"synset={s}") for e, s in wordnet_entries(opt.wordnet, opt.wordnet_names)),
            "wordnet")
    if not rows:
        raise CurateError("the query list is empty: every source is off or produced no entry")
    return rows


def write_queries(rows: List[Tuple[str, str, str]], path: str) -> None:
    """Write the query list as a tab-separated file with the header ``entry source evidence``."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        w.writerow(QUERY_HEADER)
        w.writerows(rows)


def read_queries(path: str) -> List[str]:
    """The entries of a query list written by :func:`write_queries` (or a file with one
    entry per line under an ``entry`` header).  An empty list is an error."""
    require_file(path, "query list")
    entries: List[str] = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh, delimiter="\t")
            header = next(reader, None)
            if header is None or not header or header[0] != "entry":
                raise CurateError(f"{where(path, 1)}: not a query list (the first line must be "
                                  f"a header starting with 'entry', got {header!r})")
            for row in reader:
                if not row:
                    continue
                entry = normalize_entry(row[0])
                if not entry:
                    raise CurateError(f"{where(path, reader.line_num)}: empty entry")
                entries.append(entry)
    except csv.Error as exc:
        raise CurateError(f"{path}: malformed query list: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise CurateError(f"{path}: query list is not UTF-8 text ({exc.reason})") from exc
    if not entries:
        raise CurateError(f"{path}: the query list is empty (no entries after the header)")
    return entries
