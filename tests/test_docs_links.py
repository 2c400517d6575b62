"""Every relative link and image of README.md and docs/*.md points at a file that exists, and every
``#anchor`` at a heading of its page (anchors as GitHub makes them), so moving a section cannot leave a
dead link behind."""

import re
from pathlib import Path

import pytest

from conftest import doc_pages

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> list[str]:
    """The page's lines outside fenced code blocks, inline code removed (a link or heading there is text)."""
    out, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            out.append(re.sub(r"`[^`]*`", "", line))
    return out


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation removed, each space a '-', repeats numbered."""
    seen, out, fence = {}, set(), False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"#{1,6} +(.*?)#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """``page``'s links whose file or anchor does not exist, as ``target (why)``."""
    bad = []
    for line in prose(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{target} (no file {dest})")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text())):
                bad.append(f"{target} (no heading #{anchor} in {dest.name})")
    return bad


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.name)
def test_every_relative_link_and_anchor_exists(page):
    assert not broken_links(page), f"{page.name}: {broken_links(page)}"


def test_docs_pages_exist_and_are_linked_from_the_readme():
    pages = doc_pages()
    assert len(pages) > 1, "no docs/*.md pages"
    readme = (pages[0]).read_text()
    unlinked = [p.name for p in pages[1:] if f"](docs/{p.name})" not in readme]
    assert not unlinked, f"docs pages the README's map does not link: {unlinked}"


def test_checker_finds_a_missing_file_a_missing_anchor_and_accepts_good_ones(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Method\n\n## Flow maps: one or two calls (`jump`)\n\n## Method\n")
    (tmp_path / "docs" / "pic.png").write_bytes(b"")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md#flow-maps-one-or-two-calls-jump) [repeat](docs/a.md#method-1) ![p](docs/pic.png)\n"
        "[web](https://example.com/x#y) `[code](nowhere.md)`\n"
        "```bash\n# not a heading [x](nowhere.md)\n```\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#flow-maps) [self](#nothing-here)\n")
    assert broken_links(page) == [f"docs/b.md (no file {tmp_path / 'docs' / 'b.md'})",
                                  "docs/a.md#flow-maps (no heading #flow-maps in a.md)",
                                  "#nothing-here (no heading #nothing-here in README.md)"]
