"""The repository's text describes the software, not how it was made.

Every tracked text file is searched for phrases that point at the project's own history or its task
tracker instead of stating behaviour, switches and measurements as facts. The phrase list lives in this
file only, and this file is not searched.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = (".py", ".md", ".sh", ".txt", ".cfg", ".toml", ".yml", ".yaml")


def _phrase(*words: str) -> str:
    return r"\s+".join(words)


#: regular expressions, matched case-insensitively; words are joined by ``\s+`` so that a phrase written
#: with other spacing is found too (and so that this file does not hold the phrases it forbids)
PATTERNS = tuple(re.compile(p, re.IGNORECASE) for p in (
    _phrase("the", "issue" + "'s"),
    r"\(issue",
    _phrase("as", "in", "the", "iss" + "ue"),
    r"issue\s*:",
    r"first\s+behaviour",
    r"prepared\s+before\s+this\s+switch",
    r"after\s+the\s+trainer/evaluation\s+refactor",
    r"stretch\s+target",
    r"this\s+project's\s+first",
))


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    paths = [REPO / name for name in out.stdout.split("\0") if name.endswith(TEXT_SUFFIXES)]
    return [path for path in paths if path.is_file() and path.resolve() != Path(__file__).resolve()]


def phrase_hits(path: Path, root: Path = REPO) -> list[str]:
    """``file:line: pattern: text`` for each pattern on each line of ``path`` (binary files give none); the file
    is named relative to ``root``."""
    data = path.read_bytes()
    if b"\0" in data:
        return []
    hits = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        hits += [f"{path.relative_to(root)}:{number}: {pattern.pattern!r}: {line.strip()}"
                 for pattern in PATTERNS if pattern.search(line)]
    return hits


def test_no_text_about_how_the_project_was_made():
    hits = [hit for path in tracked_text_files()
            for hit in phrase_hits(path)]
    print("\n".join(hits))
    assert hits == [], "describe the software, not its history:\n" + "\n".join(hits)


def test_the_search_finds_a_phrase_and_skips_binary_files(tmp_path):
    sample = "  ".join(["As in", "the " + "Iss" + "ue"])  # other spacing and case; not spelt out here
    (tmp_path / "notes.md").write_text(f"fine\n{sample}, this fails\n")
    (tmp_path / "blob.txt").write_bytes(sample.lower().encode() + b"\0")
    pattern = _phrase("as", "in", "the", "iss" + "ue")
    assert phrase_hits(tmp_path / "notes.md", tmp_path) == [f"notes.md:2: {pattern!r}: {sample}, this fails"]
    assert phrase_hits(tmp_path / "blob.txt", tmp_path) == []
