"""CLIP's data recipe: build a query list, match captions against it, balance the matches.

Run it as ``python -m clip_fast.curate queries|match|balance`` (see ``__main__`` for the
options and the README for a worked example).  The modules, in the order of the recipe:

* ``queries``: the query list from words, the numbers 0-99, PMI bigrams, titles and
  WordNet synset head names (or every lemma name);
* ``match``: the Aho-Corasick matcher (MetaCLIP's case-sensitive ``" entry "`` rule, or a
  lenient case-folded word-boundary rule);
* ``shards``: reading and writing the trainer's CSV format and webdataset tar shards;
* ``pipeline``: the pure per-shard passes (match, count, sample), the drivers that map
  them in this process or on Dask, and the balancing report (MetaCLIP's
  1 - prod(1 - p_e) rule, or the max over a pair's entries).

The defaults are MetaCLIP's published rules (facebookresearch/MetaCLIP).

``import clip_fast`` does not import this subpackage: its dependencies
(``pip install clip-fast[curate]``) are for curation only.
"""
from .errors import CurateError

__all__ = ["CurateError"]
