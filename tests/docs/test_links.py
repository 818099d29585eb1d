"""No broken relative link in README.md and docs/*.md: every link and image outside code
points at a file or folder of the repository, and every `#anchor` at a heading of its page."""
import os
import sys
from urllib.parse import unquote

import pytest

from markdown_pages import ROOT, anchors, links, pages, slug


def _broken(page: str):
    """(line, target, why) for each broken relative link of ``page``."""
    out = []
    here = os.path.dirname(os.path.join(ROOT, page))
    for line, target in links(page):
        if "://" in target or target.startswith(("mailto:", "tel:")):
            continue
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(here, unquote(path))) if path else os.path.join(ROOT, page)
        rel = os.path.relpath(dest, ROOT).replace(os.sep, "/")
        if rel.startswith(".."):
            out.append((line, target, "points outside the repository"))
        elif not os.path.exists(dest):
            out.append((line, target, f"{rel} does not exist"))
        elif anchor and dest.endswith(".md") and anchor not in anchors(rel):
            out.append((line, target, f"no heading of {rel} has the anchor #{anchor}"))
    return out


@pytest.mark.parametrize("page", pages())
def test_relative_links_resolve(page):
    broken = _broken(page)
    assert not broken, f"{page}: broken links:\n" + "\n".join(f"  line {n}: ({t}) {why}" for n, t, why in broken)


def test_every_docs_page_is_linked_from_the_index_and_the_readme():
    """A page that nothing links to is a page no newcomer finds."""
    for index in ("README.md", "docs/index.md"):
        here = os.path.dirname(os.path.join(ROOT, index))
        linked = {os.path.relpath(os.path.normpath(os.path.join(here, t.partition("#")[0])), ROOT).replace(os.sep, "/")
                  for _, t in links(index) if "://" not in t}
        missing = [p for p in pages() if p.startswith("docs/") and p != index and p not in linked]
        assert not missing, f"{index} does not link to {missing}"


def test_the_checker_sees_a_broken_link_and_anchor(tmp_path, monkeypatch):
    """The checker itself: a missing file and a missing anchor are reported, good ones are not."""
    import markdown_pages

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Its `second` part: here\n\n[ok](#its-second-part-here) "
                                           "[up](../README.md) [gone](missing.md) [bad](#nowhere)\n"
                                           "```bash\n[not a link](nothing.md)\n```\n`[code](nothing2.md)`\n")
    (tmp_path / "README.md").write_text("[a](docs/a.md#a-page)\n")
    monkeypatch.setattr(markdown_pages, "ROOT", str(tmp_path))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    assert _broken("README.md") == []
    assert [t for _, t, _ in _broken("docs/a.md")] == ["missing.md", "#nowhere"]
    assert slug("Several processes: `distributed=\"gather\"` and `distributed=\"ring\"`") == \
        "several-processes-distributedgather-and-distributedring"
