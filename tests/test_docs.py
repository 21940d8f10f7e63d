"""The documentation a user gets: no references to files outside the repository, and every
cited `docs/<page>.md#<anchor>` and relative Markdown link points at a page and heading that
exist (anchors as GitHub slugs them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve()
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".cfg", ".ini", ".yml", ".yaml", ""}
# where a user or contributor reads: the package, converters, scripts, tests, docs, CI
SCANNED = ["onnxsal", "converters", "benchmarks", "tests", "docs", ".ci", "README.md",
           "pyproject.toml"]
# internal design notes that only exist outside the repository
OUTSIDE = re.compile(r"\b(?:SPEC|DATA|AUTODIFF_NOTES|ARCHITECTURE)\.md\b|AUTODIFF_NOTES"
                     r"|\.\./shared\b|\bshared/[A-Z]|\bSPEC\b")
CITATION = re.compile(r"(?<![\w/.-])docs/([\w.-]+\.md)(?:#([\w-]+))?")
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITING = ["onnxsal", "converters", "benchmarks", "tests", ".ci", "README.md"]


def _files(names) -> list[Path]:
    out = []
    for name in names:
        p = ROOT / name
        paths = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for q in paths:
            if q.suffix in TEXT_SUFFIXES and "__pycache__" not in q.parts and q != SELF:
                out.append(q)
    return out


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: links reduced to their text, lower case, characters other
    than letters, digits, '_', '-' and spaces dropped, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    """The heading anchors of a Markdown file (fenced code skipped; repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_is_githubs():
    assert slug("RISE metrics") == "rise-metrics"
    assert slug("The `onnxsal.seed` input: [K, N, C]") == "the-onnxsalseed-input-k-n-c"
    assert slug("Rank-insisting operators") == "rank-insisting-operators"
    assert slug("[Covered](x.md) operators") == "covered-operators"
    assert slug("Signed maps_2") == "signed-maps_2"


def test_anchors_number_repeated_headings(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("# A\n## Notes\n```\n# not a heading\n```\n## Notes\n### Notes ##\n")
    assert anchors(md) == {"a", "notes", "notes-1", "notes-2"}


def test_no_reference_outside_the_repository():
    hits = []
    for f in _files(SCANNED):
        text = _text(f)
        if text is None:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def _citations() -> list[tuple[str, str, str | None]]:
    out = []
    for f in _files(CITING):
        text = _text(f)
        if text is None:
            continue
        for m in CITATION.finditer(text):
            out.append((str(f.relative_to(ROOT)), m.group(1), m.group(2)))
    return out


def test_cited_docs_pages_and_anchors_exist():
    cites = _citations()
    assert any(src.startswith("onnxsal") for src, _, _ in cites)  # the scan sees the code
    bad = []
    for src, page, anchor in cites:
        path = ROOT / "docs" / page
        if not path.is_file():
            bad.append(f"{src}: docs/{page} does not exist")
        elif anchor and anchor not in anchors(path):
            bad.append(f"{src}: docs/{page}#{anchor}: no such heading")
    assert not bad, "\n".join(bad)


def _md_files() -> list[Path]:
    return [f for f in _files(SCANNED) if f.suffix == ".md"]


@pytest.mark.parametrize("md", _md_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    """Links from the README, the docs pages and the results' READMEs to files of the
    repository (and headings in them) exist."""
    bad = []
    for m in MD_LINK.finditer(md.read_text(encoding="utf-8")):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no such heading")
    assert not bad, f"{md.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_readme_operator_list_is_generated_from_the_registry():
    """The README's list of covered operators is what the rule registry prints."""
    import subprocess
    import sys

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- operators:begin -->\n", "\n<!-- operators:end -->"
    assert begin in text and end in text
    listed = text.split(begin, 1)[1].split(end, 1)[0]
    generated = subprocess.run([sys.executable, "-m", "onnxsal.autodiff.rules", "--markdown"],
                               capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert listed == generated.rstrip("\n"), "regenerate with: python -m onnxsal.autodiff.rules --markdown"
