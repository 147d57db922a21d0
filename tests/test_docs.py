"""Every relative link in the Markdown docs points to a file, and every #anchor to a heading.

Why: the README leads to reference pages (docs/*.md) and to the other READMEs, section by
section; a page or heading renamed breaks those links silently on GitHub. Anchors follow GitHub's
slugs: the heading's text lowercased, Markdown (code marks, emphasis, links) reduced to its text,
punctuation other than ``-`` and ``_`` dropped, spaces made ``-``, and ``-1``, ``-2``... added to
repeats. Links inside code blocks and code spans are not links; absolute URLs are not checked (the
suite has no network).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    {
        ROOT / "README.md",
        *ROOT.glob("docs/*.md"),
        ROOT / "benchmarks" / "README.md",
        ROOT / "serve_apps" / "README.md",
        ROOT / "cluster" / "README.md",
    }
)

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.MULTILINE)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)  # http:, mailto:, //host


def prose(text: str) -> str:
    """``text`` without its fenced code blocks (blank lines stand in, so paragraphs stay apart)."""
    lines, fenced = [], None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence and (fenced is None or fence.group(1) == fenced):
            fenced = None if fenced else fence.group(1)
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return "\n".join(lines)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = CODE_SPAN.sub(lambda m: m.group(2).strip(), text)
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)  # emphasis marks, not snake_case
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, repeats numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text()).splitlines():
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    """The link targets of a Markdown file's prose (inline links, images, reference definitions)."""
    paragraphs = prose(path.read_text()).split("\n\n")  # a code span never crosses a blank line
    body = "\n\n".join(CODE_SPAN.sub("", p) for p in paragraphs)
    return INLINE_LINK.findall(body) + REFERENCE_DEF.findall(body)


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """``path``'s relative links whose file, or whose #anchor in a Markdown file, is missing."""
    broken = []
    for link in links(path):
        if EXTERNAL.match(link):
            continue
        file, _, anchor = link.partition("#")
        target = (path.parent / file).resolve() if file else path
        if not target.is_relative_to(root.resolve()) or not target.exists():
            broken.append(f"{link}: no such file in the repository")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: {target.name} has no heading with anchor #{anchor}")
    return broken


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    assert path.is_file()
    assert broken_links(path) == []


def test_a_broken_link_or_anchor_is_reported(tmp_path: Path):
    """The check itself, on a README and a page of a repository of its own."""
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "page.md").write_text("# A page\n\n## Its `first` part: *here*\n\n## Notes\n")
    (repo / "docs" / "more.md").write_text("## Notes\n\n## Notes\n")
    (tmp_path / "outside.md").write_text("# Outside the repository\n")
    readme = repo / "README.md"
    good = (
        "[page](docs/page.md#its-first-part-here) [self](#top-heading) [twice](docs/more.md#notes-1)\n"
        "[ref]: docs/page.md#notes\n\n"
        "```\n[in a code block](missing.md)\n```\n\nA span: `[x](missing.md)`, and one over two\n"
        "lines: `a [y](missing.md)\nb`.\n"
    )
    readme.write_text(f"# Top heading\n\n{good}")
    assert broken_links(readme, repo) == []

    bad = (
        "[gone](docs/gone.md) [wrong anchor](docs/page.md#no-such-part) [up](../outside.md)\n"
        "[thrice](docs/more.md#notes-2)\n\n[ref2]: docs/gone.md\n"
    )
    readme.write_text(f"# Top heading\n\n{good}\n{bad}")
    assert broken_links(readme, repo) == [
        "docs/gone.md: no such file in the repository",
        "docs/page.md#no-such-part: page.md has no heading with anchor #no-such-part",
        "../outside.md: no such file in the repository",
        "docs/more.md#notes-2: more.md has no heading with anchor #notes-2",
        "docs/gone.md: no such file in the repository",
    ]


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("The two commands", "the-two-commands"),
        ("`make demo`", "make-demo"),
        ("Serving: the aligned model and the judge over HTTP",
         "serving-the-aligned-model-and-the-judge-over-http"),
        ("2.1 Self-MOA (closed loop, weak supervision)", "21-self-moa-closed-loop-weak-supervision"),
        ("OpenAI's moderation API: `/v1/moderations`", "openais-moderation-api-v1moderations"),
        ("Config (`evaluator.yaml`)", "config-evaluatoryaml"),
        ("Chat rows (`messages`)", "chat-rows-messages"),
        ("The `snake_case` key", "the-snake_case-key"),
    ],
)  # fmt: skip
def test_slugs_follow_github(heading: str, anchor: str):
    assert slug(heading) == anchor
