"""clip_fast.curate: the query list, matching and balancing, on corpora small enough that
every count, PMI and probability below is worked out by hand in the comments.  MetaCLIP's
rules (matching, the 1 - prod balancing, synset head names) are also re-implemented here
from their published description and compared with the package."""
import csv
import io
import json
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

# The curation extra (pip install clip-fast[curate]) is optional for the loss library;
# scripts/setup.sh --test installs it, so CI runs every test here.
for _mod, _pkg in (("ahocorasick", "pyahocorasick"), ("wordfreq", "wordfreq"),
                   ("wordsegment", "wordsegment"), ("nltk", "nltk"), ("dask.distributed", "dask[distributed]")):
    pytest.importorskip(_mod, reason=f"needs {_pkg} (pip install clip-fast[curate])")

from clip_fast.curate import CurateError  # noqa: E402
from clip_fast.curate import __main__ as cli  # noqa: E402
from clip_fast.curate import pipeline, queries  # noqa: E402
from clip_fast.curate.match import Matcher  # noqa: E402
from clip_fast.curate.shards import Layout  # noqa: E402

WORDNET_DIR = queries.DEFAULT_WORDNET_DIR
needs_wordnet = pytest.mark.skipif(
    not os.path.isfile(os.path.join(WORDNET_DIR, "data.noun")),
    reason=f"WordNet files missing in {WORDNET_DIR} (apt-get install wordnet-base)")


def _write(path, text):
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return str(path)


def _query_file(path, entries):
    queries.write_queries([(e, "words", "") for e in entries], str(path))
    return str(path)


def _rows(path, sep="\t"):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter=sep))


# ------------------------------------------------------------------ words and PMI

# Three lines.  Tokens: the 2, cat 2, sat 2, ran 1, a 1, dog 1 -> 9 tokens.
# Pairs within lines: (the cat) 2, (cat sat) 1, (cat ran) 1, (a dog) 1, (dog sat) 1 -> 6.
CORPUS = "The cat sat.\nthe cat ran\nA dog sat\n"


def test_corpus_counts_by_hand(tmp_path):
    c = queries.corpus_counts(_write(tmp_path / "c.txt", CORPUS))
    assert c.unigrams == {"the": 2, "cat": 2, "sat": 2, "ran": 1, "a": 1, "dog": 1}
    assert c.bigrams == {("the", "cat"): 2, ("cat", "sat"): 1, ("cat", "ran"): 1,
                         ("a", "dog"): 1, ("dog", "sat"): 1}
    assert (c.n_tokens, c.n_bigrams) == (9, 6)


def test_pmi_by_hand(tmp_path):
    c = queries.corpus_counts(_write(tmp_path / "c.txt", CORPUS))
    p = queries.bigram_pmis(c)
    # NLTK's PMI: log2( c_xy * N / (c_x c_y) ) with N = 9 tokens.
    assert p[("the", "cat")] == pytest.approx(math.log2(4.5))   # 2*9 / (2*2)
    assert p[("cat", "sat")] == pytest.approx(math.log2(2.25))  # 9 / (2*2)
    assert p[("cat", "ran")] == pytest.approx(math.log2(4.5))   # 9 / (2*1)
    assert p[("a", "dog")] == pytest.approx(math.log2(9))       # 9 / (1*1)
    assert p[("dog", "sat")] == pytest.approx(math.log2(4.5))   # 9 / (1*2)
    assert queries.select_bigrams(p, top_k=1) == [("a dog", pytest.approx(math.log2(9)))]
    # Threshold log2(4.5): "a dog" first, then the three ties in text order.
    got = [b for b, _ in queries.select_bigrams(p, threshold=math.log2(4.5) - 1e-12)]
    assert got == ["a dog", "cat ran", "dog sat", "the cat"]
    # A minimum bigram count of 2 leaves only (the cat).
    assert list(queries.bigram_pmis(c, min_count=2)) == [("the", "cat")]


def test_pmi_equals_nltks_measure(tmp_path):
    """MetaCLIP scores its bigrams with NLTK's BigramCollocationFinder and PMI measure."""
    from nltk.collocations import BigramAssocMeasures, BigramCollocationFinder
    from nltk.probability import FreqDist

    c = queries.corpus_counts(_write(tmp_path / "c.txt", CORPUS))
    finder = BigramCollocationFinder(FreqDist(c.unigrams), FreqDist(c.bigrams))
    want = dict(finder.score_ngrams(BigramAssocMeasures.pmi))
    assert queries.bigram_pmis(c) == pytest.approx(want)


def test_words_and_bigrams_from_corpus(tmp_path):
    opt = queries.QueryOptions(words="corpus", min_count=2, corpus=_write(tmp_path / "c.txt", CORPUS),
                               bigrams="corpus", bigram_top_k=2, wordnet=None, numbers=False)
    rows = queries.build_queries(opt, log=lambda s: None)
    # Words with count >= 2, by count then text; bigrams: "a dog" (9), then "cat ran" (4.5).
    assert rows == [("cat", "words", "count=2"), ("sat", "words", "count=2"),
                    ("the", "words", "count=2"),
                    ("a dog", "bigrams", f"pmi={math.log2(9):.4f}"),
                    ("cat ran", "bigrams", f"pmi={math.log2(4.5):.4f}")]
    # Without --bigram-top-k a corpus's bigrams are cut at MetaCLIP's 30 bits, which no
    # pair of a 9-token corpus reaches (the largest PMI possible is log2(9)); the
    # numbers 0 to 99 come after the words.
    opt = queries.QueryOptions(words="corpus", min_count=2, corpus=opt.corpus, bigrams="corpus",
                               wordnet=None)
    rows = queries.build_queries(opt, log=lambda s: None)
    assert [e for e, _, _ in rows] == ["cat", "sat", "the"] + [str(i) for i in range(100)]
    assert {s for _, s, _ in rows[3:]} == {"numbers"}


def test_word_count_file(tmp_path):
    # Case is kept (MetaCLIP matches case-sensitively); forms that normalise alike add up.
    path = _write(tmp_path / "wc.tsv", "Cat\t5\ncat\t3\n\ndog\t2\nhot_dog\t7\nhot dog\t1\n.\t900\n")
    assert queries.read_word_counts(path) == {"Cat": 5, "cat": 3, "dog": 2, "hot dog": 8, ".": 900}
    opt = queries.QueryOptions(words="counts", word_counts=path, min_count=3, bigrams=None, wordnet=None,
                               numbers=False)
    # "." is one punctuation character, which MetaCLIP's list leaves out.
    assert queries.build_queries(opt, log=lambda s: None) == [
        ("hot dog", "words", "count=8"), ("Cat", "words", "count=5"), ("cat", "words", "count=3")]


def test_wordfreq_conversion():
    import wordfreq

    counts = queries.wordfreq_counts(corpus_words=10**9)
    f_the = wordfreq.get_frequency_dict("en", wordlist="large")["the"]
    assert 0.03 < f_the < 0.08  # "the" is about 5% of English text
    assert counts["the"] == round(f_the * 10**9)
    # The default corpus size and min count keep words of frequency >= 100 / 4e9 = 2.5e-8.
    big = queries.wordfreq_counts()
    assert big["the"] == round(f_the * 4e9)
    assert all(any(ch.isalpha() for ch in w) for w in big)


def test_wordsegment_pmi_matches_the_shipped_tables():
    import wordsegment

    folder = os.path.dirname(wordsegment.__file__)

    def table(name):
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            return {w: float(c) for w, c in (line.rstrip("\n").split("\t") for line in fh)}

    uni, bi = table("unigrams.txt"), table("bigrams.txt")
    total = 1024908267229.0  # wordsegment.TOTAL, the corpus's token count
    c = queries.wordsegment_counts()
    assert c.n_tokens == c.n_bigrams == total
    want = math.log2(bi["new york"] * total / (uni["new"] * uni["york"]))
    assert queries.bigram_pmis(c)[("new", "york")] == pytest.approx(want)
    # The default threshold keeps a collocation and drops a frequent function-word pair.
    pmis = queries.bigram_pmis(c)
    assert pmis[("dining", "room")] == pytest.approx(
        math.log2(bi["dining room"] * total / (uni["dining"] * uni["room"])))
    assert pmis[("dining", "room")] > queries.DEFAULT_PMI_THRESHOLD > pmis[("of", "the")]
    # MetaCLIP's 30 bits would keep none of these pairs: the default for wordsegment is 8.
    assert max(pmis.values()) < 30 == queries.DEFAULT_PMI_THRESHOLDS["corpus"]


# ------------------------------------------------------------------------ titles


def test_titles_with_volume_threshold(tmp_path):
    path = _write(tmp_path / "t.tsv", "New_York_City\t500\nParis\t50\nEiffel Tower\t100\n")
    assert queries.read_titles(path, min_volume=100) == [("New York City", 500.0), ("Eiffel Tower", 100.0)]
    assert [t for t, _ in queries.read_titles(path)] == ["New York City", "Paris", "Eiffel Tower"]
    plain = _write(tmp_path / "p.txt", "Mona Lisa\n\nStarry_Night\n")
    assert queries.read_titles(plain) == [("Mona Lisa", None), ("Starry Night", None)]
    # The query builder's default cut (MetaCLIP's 70 views) keeps a file without volumes whole.
    assert queries.read_titles(plain, 70, require_volume=False) == [("Mona Lisa", None), ("Starry Night", None)]


def test_union_records_the_first_source(tmp_path):
    # Titles: "paris" and "a dog" are already present; "Paris" differs in case, so it is a
    # new entry; "Obscure" has fewer than the default 70 views.
    opt = queries.QueryOptions(
        words="counts", word_counts=_write(tmp_path / "wc.tsv", "paris\t200\ncat\t150\nrare\t3\n"),
        bigrams="corpus", corpus=_write(tmp_path / "c.txt", CORPUS), bigram_top_k=1, numbers=False,
        titles=_write(tmp_path / "t.tsv", "paris\t90\na_dog\t90\nMona_Lisa\t90\nParis\t70\nObscure\t69\n"),
        wordnet=None)
    rows = queries.build_queries(opt, log=lambda s: None)
    assert rows == [("paris", "words", "count=200"), ("cat", "words", "count=150"),
                    ("a dog", "bigrams", f"pmi={math.log2(9):.4f}"),
                    ("Mona Lisa", "titles", "volume=90"), ("Paris", "titles", "volume=70")]
    out = tmp_path / "q.tsv"
    queries.write_queries(rows, str(out))
    assert queries.read_queries(str(out)) == ["paris", "cat", "a dog", "Mona Lisa", "Paris"]
    assert _rows(out)[3] == {"entry": "Mona Lisa", "source": "titles", "evidence": "volume=90"}


# ----------------------------------------------------------------------- WordNet


@needs_wordnet
def test_wordnet_known_synsets():
    wn = queries.wordnet_reader()
    assert wn.synset("dog.n.01").lemma_names() == ["dog", "domestic_dog", "Canis_familiaris"]
    assert wn.synset("car.n.01").lemma_names() == ["car", "auto", "automobile", "machine", "motorcar"]
    assert wn.synset("dog.n.01").lexname() == "noun.animal"  # from the lexnames table
    assert wn.get_version() == "3.0"


@needs_wordnet
@pytest.mark.slow
def test_wordnet_lemmas_adds_lemma_names_not_already_present(tmp_path):
    opt = queries.QueryOptions(words="counts", word_counts=_write(tmp_path / "wc.tsv", "dog\t500\n"),
                               bigrams=None, wordnet=WORDNET_DIR, wordnet_names="lemmas", numbers=False)
    rows = queries.build_queries(opt, log=lambda s: None)
    by_entry = {e: (s, ev) for e, s, ev in rows}
    assert len(by_entry) == len(rows)  # no entry twice
    assert by_entry["dog"] == ("words", "count=500")  # already present: stays a word
    # Lemma names found only in dog.n.01.
    assert by_entry["domestic dog"] == ("wordnet", "synset=dog.n.01")
    assert by_entry["Canis familiaris"] == ("wordnet", "synset=dog.n.01")  # case kept
    for name in ("car", "auto", "automobile", "machine", "motorcar"):
        assert by_entry[name][0] == "wordnet"
    # Every lemma of WordNet's index files (first field of each entry line), read here
    # without nltk, is in the list; "dog" came from the words.
    lemmas = set()
    for pos in ("noun", "verb", "adj", "adv"):
        with open(os.path.join(WORDNET_DIR, f"index.{pos}"), encoding="latin-1") as fh:
            lemmas.update(queries.normalize_entry(line.split(" ", 1)[0])
                          for line in fh if not line.startswith(" "))
    # nltk's lemma names keep the data files' case ("Canis_familiaris"); the index files
    # are lower case, so the two sets are compared lower-cased.
    assert len(lemmas) == 147306
    assert {e.lower() for e, s, _ in rows if s == "wordnet"} == lemmas - {"dog"}


def _head_names_from_data_files(root):
    """MetaCLIP's WordNet entries, read from the database files without nltk.

    Each synset line of data.{noun,verb,adj,adv} (wndb(5WN)) has its words from field 5
    on; nltk names a synset after its first word, lower-cased, with an adjective's
    syntactic marker ("(a)", "(p)", "(ip)") removed.  MetaCLIP keeps that name up to its
    first "." and reads "_" as a space."""
    import re

    heads = set()
    for pos in ("noun", "verb", "adj", "adv"):
        with open(os.path.join(root, f"data.{pos}"), encoding="latin-1") as fh:
            for line in fh:
                if line.startswith("  "):  # the licence header
                    continue
                word = re.sub(r"\((a|p|ip)\)$", "", line.split(" ")[4]).lower()
                heads.add(word.split(".", 1)[0].replace("_", " "))
    return heads


@needs_wordnet
@pytest.mark.slow
def test_wordnet_default_is_one_head_name_per_synset(tmp_path):
    """The issue's count: 86,555 distinct names, one of them empty (".22_caliber" and
    the like are cut at their first "."), which the query list drops."""
    heads = _head_names_from_data_files(WORDNET_DIR)
    assert len(heads) == 86555 and "" in heads
    assert {"dog", "car", "st", "jersey"} <= heads and "domestic dog" not in heads and "t-shirt" not in heads
    opt = queries.QueryOptions(words=None, bigrams=None, numbers=False, wordnet=WORDNET_DIR)
    rows = queries.build_queries(opt, log=lambda s: None)
    assert len(rows) == len({e for e, _, _ in rows})
    assert {e for e, _, _ in rows} == heads - {""}
    # Each entry's evidence names a synset whose name begins with the entry.
    assert all(ev.startswith("synset=") and ev[7:].split(".", 1)[0].replace("_", " ") == e
               for e, _, ev in rows)


# ---------------------------------------------------------------------- matching


def _metaclip_reference(caption, entries):
    """MetaCLIP's substr_matching as published: pad the text with spaces, put spaces
    around , . ; : ? ! and the backtick, turn tab, newline and carriage return into
    spaces, and report each entry whose " entry " occurs in the result."""
    text = " " + caption + " "
    for ch in [",", ".", ";", ":", "?", "!", "`"]:
        text = text.replace(ch, " " + ch + " ")
    for ch in ["\t", "\n", "\r"]:
        text = text.replace(ch, " ")
    return {e for e in entries if " " + e + " " in text}


def _lenient_reference(caption, entries):
    """The lenient rule by brute force: lower case, "_" as a space, single spaces; an
    occurrence counts when its neighbours are not letters or digits."""
    text = " ".join(caption.lower().replace("_", " ").split())
    found = set()
    for e in entries:
        key = " ".join(e.lower().replace("_", " ").split())
        for i in range(len(text) - len(key) + 1):
            if (text[i:i + len(key)] == key and (i == 0 or not text[i - 1].isalnum())
                    and (i + len(key) == len(text) or not text[i + len(key)].isalnum())):
                found.add(key)
    return found


MATCH_ENTRIES = ["dog", "cat", "shirt", "T-shirt", "St. Louis", "Louis", "new york", "york",
                 "hot dog", "c++", "e.g", "x;y", "rock 'n' roll", "dog show", "Dog"]
# (caption, MetaCLIP's matches, worked out from the rule by hand)
MATCH_TABLE = [
    ("A Dog", {"Dog"}),                        # case-sensitive: "dog" does not match
    ("a dog.", {"dog"}),                       # "." is padded
    ("dog,cat;dog:cat?dog!", {"dog", "cat"}),  # every padded character, repeated entries
    ("`dog`", {"dog"}),
    ("(dog) toy", set()),                      # "(" and ")" are not padded
    ("dog-friendly", set()), ("#dog", set()), ("dog/cat", set()), ("dog's bed", set()),
    ("my T-shirt", {"T-shirt"}),               # not "shirt": "-" is not a separator
    ("a shirt", {"shirt"}),
    ("St. Louis", {"Louis"}),                  # the entry's "." is not padded, the caption's is
    ("dog\tcat\nhot dog\r", {"dog", "cat", "hot dog"}),
    ("new  york", {"york"}),                   # two spaces: "new york" does not occur
    ("new york city", {"new york", "york"}),   # overlaps
    ("I code c++!", {"c++"}),
    ("e.g dog", {"dog"}),                      # an entry holding a padded character never matches
    ("x;y", set()),
    ("rock 'n' roll dog show", {"rock 'n' roll", "dog show", "dog"}),
    ("hotdog", set()), ("", set()),
]


def test_match_metaclip_rule_against_the_published_algorithm():
    m = Matcher(MATCH_ENTRIES)  # the default rule
    assert m.rule == "metaclip"
    for caption, by_hand in MATCH_TABLE:
        assert _metaclip_reference(caption, MATCH_ENTRIES) == by_hand, caption
        got = m.match(caption)
        assert len(got) == len(set(got)) and set(got) == by_hand, caption


def test_match_lenient_rule_against_brute_force():
    m = Matcher(MATCH_ENTRIES, rule="lenient")
    for caption, _ in MATCH_TABLE:
        got = m.match(caption)
        assert len(got) == len(set(got)) and set(got) == _lenient_reference(caption, MATCH_ENTRIES), caption
    # What the lenient rule accepts and MetaCLIP's does not.
    assert set(m.match("my T-shirt")) == {"t-shirt", "shirt"}
    assert set(m.match("St. Louis")) == {"st. louis", "louis"}
    assert set(m.match("(dog) toy")) == set(m.match("dog-friendly")) == {"dog"}
    with pytest.raises(CurateError, match="match rule"):
        Matcher(["dog"], rule="strict")


def test_match_word_boundaries():
    m = Matcher(["cat", "dog", "c++", "café"], rule="lenient")
    assert m.match("A cat.") == ["cat"]
    assert m.match("category") == []       # inside a word
    assert m.match("bobcat") == []         # end of a word
    assert m.match("dogs and cats") == []  # plural: not the entry
    assert m.match("(cat)") == ["cat"]
    assert m.match("DOG-house") == ["dog"]  # '-' is a boundary
    assert m.match("I code C++!") == ["c++"]
    assert m.match("Un CAFÉ noir") == ["café"]
    assert m.match("cat2") == []           # digits are word characters
    assert m.match("") == []


def test_match_overlaps_and_repeats():
    m = Matcher(["new york", "york", "new york city", "city", "hot dog", "dog", "dog show"], rule="lenient")
    assert m.match("New York City") == ["new york", "york", "new york city", "city"]
    assert m.match("hot dog dog show") == ["hot dog", "dog", "dog show"]  # dog once
    assert m.match("new  York_city") == ["new york", "york", "new york city", "city"]
    assert m.match("newyork") == []


# ------------------------------------------------------------ shards and passes


def _png_bytes(value):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def _csv_pool(folder, captions, name="pool.csv"):
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["filepath", "title"])
        for i, cap in enumerate(captions):
            rel = f"img/{name}-{i}.png"
            with open(os.path.join(folder, rel), "wb") as img:
                img.write(_png_bytes(i % 256))
            w.writerow([rel, cap])
    return path


def _tar_pool(path, captions):
    with tarfile.open(path, "w") as tf:
        for i, cap in enumerate(captions):
            for ext, data in (("png", _png_bytes(i % 256)), ("txt", cap.encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return str(path)


CAPTIONS = ["A cat on a mat", "category theory", "hot dog stand", "a dog and a cat",
            "nothing here", "Dog show in New York"]
ENTRIES = ["cat", "dog", "hot dog", "New York", "York", "Dog show"]
# MetaCLIP's rule: "Dog show" matches "Dog show" but "dog" does not.
MATCHED = [{"cat"}, {"hot dog", "dog"}, {"dog", "cat"}, {"Dog show", "New York", "York"}]


def test_match_csv_writes_matches_and_drops_the_rest(tmp_path):
    pool = _csv_pool(str(tmp_path), CAPTIONS)
    q = _query_file(tmp_path / "q.tsv", ENTRIES)
    out = str(tmp_path / "matched")
    r = pipeline.run_match(pool, q, out, mapper=pipeline.local_mapper(progress=False))
    assert r == {"shards": 1, "read": 6, "kept": 4}
    rows = _rows(os.path.join(out, "pool.csv"))
    assert [set(json.loads(x["matches"])) for x in rows] == MATCHED
    assert [x["title"] for x in rows] == [CAPTIONS[i] for i in (0, 2, 3, 5)]
    # Image paths are rewritten relative to the output folder and still point at the files.
    assert rows[0]["filepath"] == os.path.join("..", "img", "pool.csv-0.png")
    assert all(os.path.isfile(os.path.join(out, x["filepath"])) for x in rows)


def test_match_tar_shards(tmp_path):
    shard = _tar_pool(tmp_path / "pool-000.tar", CAPTIONS)
    q = _query_file(tmp_path / "q.tsv", ENTRIES)
    out = str(tmp_path / "matched")
    r = pipeline.run_match(shard, q, out, mapper=pipeline.local_mapper(progress=False))
    assert r == {"shards": 1, "read": 6, "kept": 4}
    with tarfile.open(os.path.join(out, "pool-000.tar")) as tf:
        names = tf.getnames()
        got = [set(json.loads(tf.extractfile(n).read())) for n in names if n.endswith(".matches.json")]
    assert got == MATCHED
    assert "s0001.png" not in names and "s0000.png" in names  # "category theory" dropped


def test_keep_probability_by_hand():
    counts = {"a": 50, "b": 10, "c": 40}
    for rule in ("any", "max"):
        assert pipeline.keep_probability(["a"], counts, 10, rule) == pytest.approx(0.2)  # 10/50
        assert pipeline.keep_probability(["a", "b"], counts, 10, rule) == 1.0  # b is in the tail
        assert pipeline.keep_probability([], counts, 10, rule) == 0.0
    # any (the default): 1 - (1 - 10/50)(1 - 10/40) = 1 - 0.8 * 0.75 = 0.4; max: 0.25.
    assert pipeline.keep_probability(["a", "c"], counts, 10) == pytest.approx(0.4)
    assert pipeline.keep_probability(["a", "c", "a"], counts, 10) == pytest.approx(0.4)  # once per entry
    assert pipeline.keep_probability(["a", "c"], counts, 10, "max") == pytest.approx(0.25)
    # The example: counts 2,050 and 2,000 at t = 200.
    big = {"x": 2050, "y": 2000}
    assert pipeline.keep_probability(["x", "y"], big, 200) == pytest.approx(1 - (1 - 200 / 2050) * 0.9)
    assert round(pipeline.keep_probability(["x", "y"], big, 200), 3) == 0.188
    assert pipeline.keep_probability(["x", "y"], big, 200, "max") == pytest.approx(0.1)
    with pytest.raises(CurateError, match="combine"):
        pipeline.keep_probability(["a"], counts, 10, "min")


# A pool where pairs hold 1, 2 and 3 head entries (t = 20): counts A 200, B 170, C 90.
BALANCE_POOL = ([["A"]] * 100 + [["B"]] * 50 + [["C"]] * 30 + [["A", "B"]] * 60
                + [["B", "C"]] * 20 + [["A", "B", "C"]] * 40)
BALANCE_T = 20


def _metaclip_pair_probability(entries, counts, t):
    """MetaCLIP's balancing.py, as an expectation: each entry e is drawn with
    probability t / max(count(e), t) and the pair is kept if any draw succeeds."""
    p_fail = 1.0
    for e in set(entries):
        p_fail *= 1.0 - t / max(counts[e], t)
    return 1.0 - p_fail


def test_balance_any_rule_against_metaclip_over_seeds(tmp_path):
    """Kept pairs, per entry and in total, averaged over 400 seeds, agree with MetaCLIP's
    expectation within 5 standard errors (each pair is an independent Bernoulli draw, so
    a kept count has variance sum p(1 - p) and its mean over S seeds that over S)."""
    src = _matched_csv(tmp_path / "m.csv", BALANCE_POOL)
    counts = {"A": 0, "B": 0, "C": 0}
    for m in BALANCE_POOL:
        for e in set(m):
            counts[e] += 1
    assert counts == {"A": 200, "B": 170, "C": 90}
    probs = [_metaclip_pair_probability(m, counts, BALANCE_T) for m in BALANCE_POOL]
    keys = ["total", "A", "B", "C"]
    want = {k: sum(p for m, p in zip(BALANCE_POOL, probs) if k == "total" or k in m) for k in keys}
    var = {k: sum(p * (1 - p) for m, p in zip(BALANCE_POOL, probs) if k == "total" or k in m) for k in keys}
    seeds = 400
    kept = {k: [] for k in keys}
    for seed in range(seeds):
        r = pipeline.sample_shard((0, src, None), counts, BALANCE_T, seed, Layout())
        assert r.expected == pytest.approx({k: want[k] for k in "ABC"})  # the report's column
        kept["total"].append(r.kept)
        for e in "ABC":
            kept[e].append(r.kept_counts[e])
    for k in keys:
        se = math.sqrt(var[k] / seeds)
        assert abs(np.mean(kept[k]) - want[k]) < 5 * se, (k, np.mean(kept[k]), want[k], se)
    # The max rule's expectation is lower by more than 20 standard errors here, so the
    # test tells the two rules apart.
    want_max = sum(max(BALANCE_T / max(counts[e], BALANCE_T) for e in m) for m in BALANCE_POOL)
    assert want["total"] - want_max > 20 * math.sqrt(var["total"] / seeds)


def test_balance_max_rule_over_seeds(tmp_path):
    """--combine max: the same pool, the expectation sum of max_e p_e, same 5-sigma bound."""
    src = _matched_csv(tmp_path / "m.csv", BALANCE_POOL)
    counts = {"A": 200, "B": 170, "C": 90}
    probs = [max(BALANCE_T / counts[e] for e in m) for m in BALANCE_POOL]
    want, var = sum(probs), sum(p * (1 - p) for p in probs)
    totals = [pipeline.sample_shard((0, src, None), counts, BALANCE_T, seed, Layout(), combine="max").kept
              for seed in range(400)]
    assert abs(np.mean(totals) - want) < 5 * math.sqrt(var / 400)


def _matched_csv(path, match_lists):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["filepath", "title", "matches"])
        for i, m in enumerate(match_lists):
            w.writerow([f"/img/{i}.png", " ".join(m), json.dumps(m)])
    return str(path)


def test_balance_expected_counts_by_hand(tmp_path):
    # 40 pairs match only "a", 10 match "a" and "b", 5 match only "c"; t = 10.
    # counts: a 50, b 10, c 5.  p: ["a"] 10/50 = 0.2, ["a","b"] 1 (b in the tail), ["c"] 1.
    # expected kept: a = 40*0.2 + 10*1 = 18, b = 10, c = 5.
    lists = [["a"]] * 40 + [["a", "b"]] * 10 + [["c"]] * 5
    src = _matched_csv(tmp_path / "m.csv", lists)
    res = pipeline.run_balance(src, str(tmp_path / "out"), t=10, seed=3,
                               mapper=pipeline.local_mapper(progress=False))
    assert dict(res.counts) == {"a": 50, "b": 10, "c": 5}
    assert res.expected == pytest.approx({"a": 18.0, "b": 10.0, "c": 5.0})
    # Tail pairs are all kept; "a" keeps its 10 shared pairs plus a share of the 40 others.
    assert res.kept_counts["b"] == 10 and res.kept_counts["c"] == 5
    assert 10 <= res.kept_counts["a"] <= 50
    assert res.read == 55 and res.kept == len(_rows(res.outputs[-1]))
    assert os.listdir(tmp_path / "out") == ["balanced.csv"]  # the per-shard parts are merged


def test_balance_caps_each_entry_at_t_in_expectation(tmp_path):
    # Pairs with one entry each: "head" 1000 pairs, "mid" 150, "tail" 30; t = 100.
    # Expected kept = min(count, t): 100, 100, 30; the mean over 200 seeds must agree.
    lists = [["head"]] * 1000 + [["mid"]] * 150 + [["tail"]] * 30
    src = _matched_csv(tmp_path / "m.csv", lists)
    counts = pipeline.count_shard(src, Layout())
    assert counts == {"head": 1000, "mid": 150, "tail": 30}
    kept = {"head": [], "mid": [], "tail": []}
    for seed in range(200):
        r = pipeline.sample_shard((0, src, None), dict(counts), 100, seed, Layout())
        assert r.expected == pytest.approx({"head": 100.0, "mid": 100.0, "tail": 30.0})
        for e in kept:
            kept[e].append(r.kept_counts[e])
    assert kept["tail"] == [30] * 200
    # head: Binomial(1000, 0.1), sd 9.5, so the mean of 200 has sd 0.67; mid: sd 0.4.
    assert np.mean(kept["head"]) == pytest.approx(100, abs=3)
    assert np.mean(kept["mid"]) == pytest.approx(100, abs=2)
    assert np.std(kept["head"]) == pytest.approx(math.sqrt(1000 * 0.1 * 0.9), rel=0.25)


def test_balance_is_reproducible_under_a_seed(tmp_path):
    lists = [["a"]] * 300 + [["b"]] * 300 + [["a", "b"]] * 50
    half = len(lists) // 2
    spec = (_matched_csv(tmp_path / "m0.csv", lists[:half]) + "::"
            + _matched_csv(tmp_path / "m1.csv", lists[half:]))

    def run(seed, name):
        res = pipeline.run_balance(spec, str(tmp_path / name), t=50, seed=seed,
                                   mapper=pipeline.local_mapper(progress=False))
        with open(res.outputs[-1], encoding="utf-8") as fh:
            return fh.read(), res

    a, ra = run(7, "a")
    b, rb = run(7, "b")
    c, _ = run(8, "c")
    assert a == b and ra.kept_counts == rb.kept_counts
    assert a != c


@pytest.mark.parametrize("combine", ["any", "max"])
def test_report_expected_follows_the_rule(tmp_path, combine):
    # 30 pairs ["a"], 10 ["a", "c"], 10 ["c"]; t = 10: counts a 40, c 20; p_a 0.25, p_c 0.5.
    # ["a", "c"]: any 1 - 0.75 * 0.5 = 0.625, max 0.5.
    lists = [["a"]] * 30 + [["a", "c"]] * 10 + [["c"]] * 10
    src = _matched_csv(tmp_path / "m.csv", lists)
    out = str(tmp_path / "out")
    res = pipeline.run_balance(src, out, t=10, seed=0, mapper=pipeline.local_mapper(progress=False),
                               combine=combine)
    pipeline.write_report(res, 10, os.path.join(out, "report.csv"), None)
    shared = 0.625 if combine == "any" else 0.5
    want = {"a": 30 * 0.25 + 10 * shared, "c": 10 * 0.5 + 10 * shared}
    rows = {r["entry"]: float(r["expected_after"]) for r in _rows(os.path.join(out, "report.csv"))}
    assert rows == pytest.approx(want, abs=5e-4)


def test_report_and_plot(tmp_path):
    lists = [["a"]] * 40 + [["a", "b"]] * 10 + [["c"]] * 5
    src = _matched_csv(tmp_path / "m.csv", lists)
    out = str(tmp_path / "out")
    res = pipeline.run_balance(src, out, t=10, seed=0, mapper=pipeline.local_mapper(progress=False))
    pipeline.write_report(res, 10, os.path.join(out, "report.csv"), os.path.join(out, "report.png"))
    rows = _rows(os.path.join(out, "report.csv"))
    assert [(r["entry"], r["count_before"], r["part"]) for r in rows] == [
        ("a", "50", "head"), ("b", "10", "tail"), ("c", "5", "tail")]
    assert [r["expected_after"] for r in rows] == ["18.000", "10.000", "5.000"]
    with open(os.path.join(out, "report.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------- scale


def test_dask_run_equals_single_process(tmp_path):
    from dask.distributed import Client, LocalCluster

    caps = [f"{w} number {i}" for i in range(200) for w in ("cat", "dog", "hot dog", "a bird")]
    pools = [_csv_pool(str(tmp_path), caps[k::3], name=f"pool-{k}.csv") for k in range(3)]
    spec = "::".join(pools)
    q = _query_file(tmp_path / "q.tsv", ["cat", "dog", "hot dog", "bird", "number"])
    local = pipeline.local_mapper(progress=False)
    pipeline.run_match(spec, q, str(tmp_path / "m1"), mapper=local)
    r1 = pipeline.run_balance(str(tmp_path / "m1"), str(tmp_path / "b1"), t=60, seed=5, mapper=local)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as lc, \
            Client(lc) as client:
        dm = pipeline.dask_mapper(client)
        pipeline.run_match(spec, q, str(tmp_path / "m2"), mapper=dm)
        r2 = pipeline.run_balance(str(tmp_path / "m2"), str(tmp_path / "b2"), t=60, seed=5, mapper=dm)
    for k in range(3):
        with open(tmp_path / "m1" / f"pool-{k}.csv", "rb") as f1, open(tmp_path / "m2" / f"pool-{k}.csv", "rb") as f2:
            assert f1.read() == f2.read()
    with open(r1.outputs[-1], "rb") as f1, open(r2.outputs[-1], "rb") as f2:
        assert f1.read() == f2.read()
    # counts: cat 200, dog 200 + 200 (hot dog), hot dog 200, bird 200, number 800.
    assert dict(r1.counts) == {"cat": 200, "dog": 400, "hot dog": 200, "bird": 200, "number": 800}
    assert r1.counts == r2.counts and r1.kept_counts == r2.kept_counts and r1.kept == r2.kept
    # The CLI's --dask local runs the same passes on its own LocalCluster.
    assert cli.main(["balance", "--input", str(tmp_path / "m1"), "--out", str(tmp_path / "b3"),
                     "--max-per-query", "60", "--seed", "5", "--no-plot", "--dask", "local"]) == 0
    with open(r1.outputs[-1], "rb") as f1, open(tmp_path / "b3" / "balanced.csv", "rb") as f3:
        assert f1.read() == f3.read()


# --------------------------------------------------------------- into the trainer


def test_balanced_output_loads_in_the_trainer(tmp_path):
    from clip_fast.train import data as data_mod
    import torch

    pool = _csv_pool(str(tmp_path / "raw"), CAPTIONS)
    q = _query_file(tmp_path / "q.tsv", ENTRIES)
    assert cli.main(["match", "--queries", q, "--input", pool, "--out", str(tmp_path / "m")]) == 0
    assert cli.main(["balance", "--input", str(tmp_path / "m"), "--out", str(tmp_path / "b"),
                     "--max-per-query", "2", "--no-plot"]) == 0
    ds = data_mod.CsvDataset(str(tmp_path / "b" / "balanced.csv"), image_size=8)
    imgs, caps = ds.get(torch.arange(len(ds)), torch.Generator())
    assert imgs.shape == (len(ds), 3, 8, 8)
    assert set(caps) <= {CAPTIONS[i] for i in (0, 2, 3, 5)} and len(caps) >= 3

    shard = _tar_pool(tmp_path / "raw" / "pool-000.tar", CAPTIONS)
    assert cli.main(["match", "--queries", q, "--input", shard, "--out", str(tmp_path / "tm")]) == 0
    assert cli.main(["balance", "--input", str(tmp_path / "tm"), "--out", str(tmp_path / "tb"),
                     "--max-per-query", "100", "--no-plot"]) == 0
    tds = data_mod.TarDataset(str(tmp_path / "tb"), image_size=8)
    _, tcaps = tds.get(torch.arange(len(tds)), torch.Generator())
    tds.close()
    assert tcaps == [CAPTIONS[i] for i in (0, 2, 3, 5)]  # t above every count: all kept


def test_import_clip_fast_does_not_import_curate():
    code = "import sys, clip_fast; print(any(m.startswith('clip_fast.curate') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------- bad input


def _err(fn, *a, **k):
    with pytest.raises(CurateError) as ei:
        fn(*a, **k)
    return str(ei.value)


def test_errors_name_the_file_and_line(tmp_path):
    missing = str(tmp_path / "nope.txt")
    assert missing in _err(queries.corpus_counts, missing)
    bad_wc = _write(tmp_path / "wc.tsv", "cat\t5\ndog\tmany\n")
    assert f"{bad_wc}:2:" in _err(queries.read_word_counts, bad_wc)
    bad_wc2 = _write(tmp_path / "wc2.tsv", "cat 5\n")
    assert f"{bad_wc2}:1:" in _err(queries.read_word_counts, bad_wc2)
    bad_t = _write(tmp_path / "t.tsv", "Paris\t10\nRome\tlots\n")
    assert f"{bad_t}:2:" in _err(queries.read_titles, bad_t)
    mixed = _write(tmp_path / "t2.tsv", "Paris\t10\nRome\n")
    assert f"{mixed}:2:" in _err(queries.read_titles, mixed)
    nov = _write(tmp_path / "t3.tsv", "Paris\nRome\n")
    assert f"{nov}:1:" in _err(queries.read_titles, nov, min_volume=5)
    latin = tmp_path / "c.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    assert f"{latin}:1:" in _err(queries.corpus_counts, str(latin))
    assert str(tmp_path / "nowordnet") in _err(queries.wordnet_reader, str(tmp_path / "nowordnet"))


def test_empty_query_list_is_an_error(tmp_path):
    msg = _err(queries.build_queries, queries.QueryOptions(words=None, bigrams=None, wordnet=None, numbers=False),
               log=lambda s: None)
    assert "empty" in msg
    empty = _write(tmp_path / "q.tsv", "entry\tsource\tevidence\n")
    assert empty in _err(queries.read_queries, empty) and "empty" in _err(queries.read_queries, empty)
    pool = _csv_pool(str(tmp_path), CAPTIONS)
    assert empty in _err(pipeline.run_match, pool, empty, str(tmp_path / "m"))
    # Counts too low for any word: the list is empty as well.
    opt = queries.QueryOptions(words="counts", word_counts=_write(tmp_path / "wc.tsv", "cat\t1\n"),
                               bigrams=None, wordnet=None, numbers=False)
    assert "empty" in _err(queries.build_queries, opt, log=lambda s: None)


def test_caption_file_errors(tmp_path, capsys):
    q = _query_file(tmp_path / "q.tsv", ENTRIES)
    pool = _csv_pool(str(tmp_path), CAPTIONS)
    msg = _err(pipeline.run_match, pool, q, str(tmp_path / "m"), Layout(caption_key="caption"))
    assert f"{pool}:1:" in msg and "'caption'" in msg and "--csv-caption-key" in msg
    ragged = _write(tmp_path / "ragged.csv", "filepath\ttitle\na.png\ta cat\nb.png\ta dog\textra\n")
    assert f"{ragged}:3:" in _err(pipeline.run_match, ragged, q, str(tmp_path / "m2"))
    missing = str(tmp_path / "absent.csv")
    assert missing in _err(pipeline.run_match, missing, q, str(tmp_path / "m3"))
    not_tar = tmp_path / "junk.tar"
    not_tar.write_bytes(b"not a tar file at all" * 40)
    assert str(not_tar) in _err(pipeline.run_match, str(not_tar), q, str(tmp_path / "m4"))
    # balance needs the matches column that match writes.
    assert f"{pool}:1:" in _err(pipeline.run_balance, pool, str(tmp_path / "b"))
    # The CLI prints the error and exits with status 2.
    assert cli.main(["match", "--queries", q, "--input", pool, "--out", str(tmp_path / "m5"),
                     "--csv-caption-key", "caption"]) == 2
    assert "no column 'caption'" in capsys.readouterr().err


def test_cli_queries_sources_and_switches(tmp_path, capsys):
    corpus = _write(tmp_path / "c.txt", CORPUS)
    titles = _write(tmp_path / "t.tsv", "Mona_Lisa\t50\nParis\t5\n")
    out = str(tmp_path / "q.tsv")
    assert cli.main(["queries", "--out", out, "--words", "corpus", "--corpus", corpus, "--min-count", "2",
                     "--bigrams", "corpus", "--bigram-top-k", "1", "--titles", titles,
                     "--title-min-volume", "10", "--no-wordnet", "--no-numbers"]) == 0
    assert [(r["entry"], r["source"]) for r in _rows(out)] == [
        ("cat", "words"), ("sat", "words"), ("the", "words"), ("a dog", "bigrams"), ("Mona Lisa", "titles")]
    # Every source off: an empty list is an error, and no file is written.
    empty = str(tmp_path / "none.tsv")
    assert cli.main(["queries", "--out", empty, "--words", "off", "--bigrams", "off", "--no-wordnet",
                     "--no-numbers"]) == 2
    assert "query list is empty" in capsys.readouterr().err and not os.path.exists(empty)
    # A missing corpus names the file.
    assert cli.main(["queries", "--out", empty, "--words", "corpus", "--corpus", str(tmp_path / "x.txt"),
                     "--bigrams", "off", "--no-wordnet"]) == 2
    assert str(tmp_path / "x.txt") in capsys.readouterr().err


def test_cli_match_and_combine_options(tmp_path, capsys):
    """--match lenient and --combine max reach the passes; the defaults are MetaCLIP's."""
    pool = _csv_pool(str(tmp_path), ["A Dog", "dog-friendly", "a dog", "a cat and a dog"] * 5)
    q = _query_file(tmp_path / "q.tsv", ["dog", "cat"])
    assert cli.main(["match", "--queries", q, "--input", pool, "--out", str(tmp_path / "m")]) == 0
    assert len(_rows(tmp_path / "m" / "pool.csv")) == 10  # "A Dog" and "dog-friendly" dropped
    assert cli.main(["match", "--queries", q, "--input", pool, "--out", str(tmp_path / "ml"),
                     "--match", "lenient"]) == 0
    assert len(_rows(tmp_path / "ml" / "pool.csv")) == 20
    # counts dog 10, cat 5; t = 2: p_dog 0.2, p_cat 0.4; ["cat", "dog"]: any 0.52, max 0.4.
    for combine, p_shared in (("any", 0.52), ("max", 0.4)):
        out = tmp_path / f"b-{combine}"
        assert cli.main(["balance", "--input", str(tmp_path / "m"), "--out", str(out), "--max-per-query", "2",
                         "--combine", combine, "--no-plot"]) == 0
        rows = {r["entry"]: float(r["expected_after"]) for r in _rows(out / "report.csv")}
        assert rows == pytest.approx({"dog": 5 * 0.2 + 5 * p_shared, "cat": 5 * p_shared}, abs=5e-4)
    assert "combine=max" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["balance", "--input", str(tmp_path / "m"), "--out", str(tmp_path / "x"), "--combine", "min"])


@pytest.mark.parametrize("command, module", [
    (["match", "--queries", "Q", "--input", "POOL", "--out", "OUT"], "ahocorasick"),
    (["queries", "--out", "OUT", "--no-wordnet", "--bigrams", "off"], "wordfreq"),
    (["queries", "--out", "OUT", "--words", "off", "--bigrams", "off"], "nltk"),
    (["balance", "--input", "OUT", "--out", "OUT2", "--no-plot"], "numpy"),
])
def test_cli_names_the_extra_when_a_module_is_missing(tmp_path, command, module):
    """Without the curate extra each command says what to install, with no traceback."""
    pool = _csv_pool(str(tmp_path), CAPTIONS)
    q = _query_file(tmp_path / "q.tsv", ENTRIES)
    assert cli.main(["match", "--queries", q, "--input", pool, "--out", str(tmp_path / "OUT")]) == 0
    args = [{"Q": q, "POOL": pool}.get(a, str(tmp_path / a) if a.startswith("OUT") else a) for a in command]
    # The module is hidden the way Python reports an absent one (None in sys.modules).
    code = (f"import sys; sys.modules[{module!r}] = None; "
            f"from clip_fast.curate.__main__ import main; sys.exit(main({args!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd())
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert f"'{module}'" in out.stderr and "pip install 'clip-fast[curate]'" in out.stderr
