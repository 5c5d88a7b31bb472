"""Every reference to docs/architecture.md in the repository's source, protos and docs names a real section.

A reference is ``docs/architecture.md, <Heading>`` (the heading exactly, ended by punctuation or the
end of the line) or a Markdown link ``architecture.md#<anchor>``. The design card's old forms
("ARCHITECTURE.md contract 3", "contract B") point to a document that is not in the repository and are
refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
SUFFIXES = {".py", ".proto", ".md", ".yaml", ".yml", ".js", ".toml", ".txt"}
# Generated, installed or produced at run time: not written by hand, so not checked.
SKIPPED_DIRS = {".git", ".venv", "node_modules", "var", "__pycache__", "build", "dist"}
GENERATED = ROOT / "cbir" / "v1"

REFERENCE = re.compile(r"docs/architecture\.md,[ \t]*([^\n)\].;:,\"'`*]*)")
LINK = re.compile(r"architecture\.md#([A-Za-z0-9_-]*)")
# Built from pieces so that this file does not match itself.
OLD_FORM = re.compile("ARCHI" + r"TECTURE\b|\bcontracts? (?:[0-9]+|[A-Z])\b")


def headings(markdown: str) -> set[str]:
    """The titles of every Markdown heading outside code blocks."""
    titles, fenced = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            titles.add(match.group(1).strip())
    return titles


def anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def problems(text: str, titles: set[str]) -> list[str]:
    """What is wrong with the references in ``text``, one line each ("line N: ...")."""
    anchors = {anchor(t) for t in titles}
    found = []

    def line_of(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    for match in REFERENCE.finditer(text):
        name = match.group(1).strip()
        if name not in titles:
            found.append(f"line {line_of(match.start())}: no section {name!r} in docs/architecture.md")
    for match in LINK.finditer(text):
        if match.group(1) not in anchors:
            found.append(
                f"line {line_of(match.start())}: no anchor #{match.group(1)} in docs/architecture.md"
            )
    for match in OLD_FORM.finditer(text):
        found.append(
            f"line {line_of(match.start())}: {match.group(0)!r} is the design card's numbering; cite "
            "'docs/architecture.md, <section>' instead"
        )
    return found


def sources() -> list[Path]:
    files = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(p in SKIPPED_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        if path.is_file() and path.suffix in SUFFIXES and GENERATED not in path.parents:
            if path != Path(__file__).resolve():
                files.append(path)
    return sorted(files)


def test_architecture_headings_are_unique():
    lines = [line for line in ARCHITECTURE.read_text().splitlines() if re.match(r"#{1,6} ", line)]
    titles = [line.lstrip("#").strip() for line in lines]
    assert len(titles) == len(set(titles)), "a cited heading must name one section"
    for section in ("Model", "Repository", "Embedding space", "Durability", "Errors", "Plumbing", "Clients"):
        assert section in titles


def test_every_reference_resolves():
    titles = headings(ARCHITECTURE.read_text())
    report, references = [], 0
    for path in sources():
        text = path.read_text(errors="replace")
        references += len(REFERENCE.findall(text)) + len(LINK.findall(text))
        report += [f"{path.relative_to(ROOT)}: {p}" for p in problems(text, titles)]
    assert not report, "\n".join(report)
    # The source cites the document in many places; finding none would mean the search is broken.
    assert references >= 20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see (docs/architecture.md, Durability).", []),
        ("# docs/architecture.md, Embedding space: the gateway pins it", []),
        ("[docs/architecture.md, Model](../docs/architecture.md#model)", []),
        ("see (docs/architecture.md, Durabilty).", ["no section 'Durabilty'"]),
        ("see docs/architecture.md,\nDurability", ["no section ''"]),
        ("[x](../docs/architecture.md#durabilty)", ["no anchor #durabilty"]),
        ("Consistency (ARCHITECTURE.md contract 3).", ["design card's numbering", "design card's numbering"]),
        ("the client (contract C).", ["design card's numbering"]),
    ],
)
def test_problems_are_found(text, expected):
    titles = {"Durability", "Embedding space", "Model"}
    found = problems(text, titles)
    assert len(found) == len(expected), found
    for problem, words in zip(found, expected, strict=True):
        assert words in problem
