"""The documentation's references hold: nothing points outside the repository, and every
citation of the math note names it as docs/MATH.md with a section that exists there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MATH = ROOT / "docs/MATH.md"
SCANNED = ("README.md", "tunnelgraph", "tests", "examples", "benchmarks", "docs")
SUFFIXES = {".py", ".md", ".rst", ".txt", ".toml", ".cfg", ".ini", ".json", ".yaml", ".yml", ".sh"}
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
GENERATED = {ROOT / "benchmarks" / "out"}  # ignored benchmark output, not part of the repository

# Paths that lead out of the checkout: an absolute path into a machine's own folders (not the
# tail of a URL), or the shared folder that lives beside the repository.
OUTSIDE = [
    re.compile(r"(?<![\w.:/~-])/(?:work|home|Users|mnt|root)/"),
    re.compile(r"(?:\.\./)+shared\b"),
    re.compile(r"(?<![\w.-])shared/(?:paper|data)\b"),
]
NOTE = re.compile(r"(?<!\w)MATH\.md")
QUALIFIED = re.compile(r"(?<![\w/.-])docs/MATH\.md")
RELATIVE_LINK = re.compile(r"(?<=\]\()MATH\.md(?=[#)])")  # a link target in a file inside docs/
NUMBERS = r"\d+(?:\.\d+)*(?:(?:\s*,\s*and\s+|\s*,\s*|\s+and\s+)\d+(?:\.\d+)*)*"
CITATIONS = [
    # "docs/MATH.md section 4", "docs/MATH.md sections 4, 5 and 7", across a line break or a
    # comment marker, or after a Markdown link: "[docs/MATH.md](docs/MATH.md) section 4"
    re.compile(r"docs/MATH\.md(?:\]\([^)\s]*\))?[\s#*]+sections?\s+(" + NUMBERS + ")"),
    # "section 4 of docs/MATH.md"
    re.compile(r"sections?\s+(" + NUMBERS + r")[\s#*]+of[\s#*]+(?:the\s+)?docs/MATH\.md"),
]
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s+\S", re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
            continue
        for candidate in sorted(path.rglob("*")):
            if not candidate.is_file() or candidate.suffix not in SUFFIXES:
                continue
            if SKIPPED_DIRS & set(candidate.relative_to(ROOT).parts):
                continue
            if any(root in candidate.parents for root in GENERATED):
                continue
            files.append(candidate)
    return files


def line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def without_fences(text: str) -> str:
    """``text`` with fenced code blocks blanked out (line numbers kept)."""
    return re.sub(r"^[ \t]*```.*?^[ \t]*```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.M | re.S)


def math_sections() -> set[str]:
    return set(HEADING.findall(without_fences(MATH.read_text(encoding="utf-8"))))


def cited_sections(text: str) -> list[tuple[int, list[str]]]:
    found = []
    for pattern in CITATIONS:
        for match in pattern.finditer(text):
            numbers = re.findall(r"\d+(?:\.\d+)*", match.group(1))
            found.append((line_of(text, match.start()), numbers))
    return found


def test_the_files_scanned_include_the_package_and_the_docs() -> None:
    files = {path.relative_to(ROOT).as_posix() for path in scanned_files()}
    assert {"README.md", "docs/MATH.md", "tunnelgraph/api.py", "tests/test_docs.py"} <= files


def test_nothing_refers_to_a_path_outside_the_repository() -> None:
    problems = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for pattern in OUTSIDE:
            for match in pattern.finditer(text):
                problems.append(f"{path.relative_to(ROOT)}:{line_of(text, match.start())}: {match.group(0)!r}")
        if path.suffix != ".md":
            continue
        for match in LINK.finditer(without_fences(text)):
            target = match.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # a URL or an anchor in the same file
            resolved = (path.parent / target.split("#", 1)[0]).resolve()
            if ROOT != resolved and ROOT not in resolved.parents:
                problems.append(f"{path.relative_to(ROOT)}:{line_of(text, match.start())}: link {target!r} "
                                "leaves the repository")
            elif not resolved.exists():
                problems.append(f"{path.relative_to(ROOT)}:{line_of(text, match.start())}: link {target!r} "
                                "names a file that does not exist")
    assert not problems, "references outside the repository:\n" + "\n".join(problems)


def test_the_math_note_is_always_cited_as_docs_math_md() -> None:
    problems = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        allowed = {match.end() for match in QUALIFIED.finditer(text)}
        if path.parent == ROOT / "docs":
            allowed |= {match.end() for match in RELATIVE_LINK.finditer(text)}
        for match in NOTE.finditer(text):
            if match.end() not in allowed:
                start = text.rfind("\n", 0, match.start()) + 1
                problems.append(f"{path.relative_to(ROOT)}:{line_of(text, match.start())}: "
                                f"{text[start:match.end() + 20].strip()!r}")
    assert not problems, "cite the math note as docs/MATH.md:\n" + "\n".join(problems)


def test_math_note_sections_are_numbered_from_one() -> None:
    top = sorted(int(number) for number in math_sections() if "." not in number)
    assert top == list(range(1, len(top) + 1)) and len(top) >= 10, top


def test_every_cited_section_exists() -> None:
    sections = math_sections()
    citations = 0
    problems = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for line, numbers in cited_sections(text):
            citations += 1
            for number in numbers:
                if number not in sections:
                    problems.append(f"{path.relative_to(ROOT)}:{line}: section {number} is not a heading of "
                                    "docs/MATH.md")
    assert not problems, "\n".join(problems)
    assert citations >= 10, f"only {citations} citations of docs/MATH.md sections found: is the parser broken?"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see docs/MATH.md section 4.", [["4"]]),
        ("(docs/MATH.md sections 4, 5 and 7)", [["4", "5", "7"]]),
        ("applies docs/MATH.md\n    section 2 through", [["2"]]),
        ("the identity of docs/MATH.md\n    # section 4", [["4"]]),
        ("[docs/MATH.md](docs/MATH.md) section 4.3", [["4.3"]]),
        ("section 6 of docs/MATH.md", [["6"]]),
        ("docs/MATH.md has ten sections", []),
    ],
)
def test_citation_parser(text: str, expected: list[list[str]]) -> None:
    assert [numbers for _, numbers in cited_sections(text)] == expected


def test_readme_links_the_math_note_and_the_docs_index_lists_every_page() -> None:
    assert "](docs/MATH.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    linked = {target.split("#", 1)[0] for target in LINK.findall(index)}
    pages = {path.name for path in (ROOT / "docs").glob("*.md") if path.name != "README.md"}
    assert pages <= linked, f"docs/README.md does not link {sorted(pages - linked)}"
