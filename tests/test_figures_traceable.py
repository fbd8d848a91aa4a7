"""Every quoted figure traceable to a log: a paragraph or table of the README and docs that states a
measured figure names a log in ``benchmarks/results/`` (or the paragraph before it does), and every log
they cite exists and starts with the command that wrote it and the commit it ran at (``benchmarks/logs.py``'s
header). A paragraph whose numbers are settings, limits, definitions or arithmetic, not measurements,
says so with an ``<!-- not measured: WHY -->`` comment."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GENERATED = ("config.md", "api.md")  # written from the code's comments and docstrings (scripts/gen_*.py)
NOT_MEASURED = re.compile(r"<!-- not measured: [^>]+-->")
CITED = re.compile(r"benchmarks/results/[\w.\-]+\.log")
HEADER = re.compile(r"^# (?:python benchmarks/\S+\.py|retrieval|mmpretrain)\b.*\bcommit [0-9a-f]{7}")
# a measured figure: a ratio (12.2x), a time, a size, a rate or a percentage; not inside code
FIGURE = re.compile(
    r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(?:x(?![\w])|ms\b|MiB\b|GiB\b|MB\b|GB\b|q/s\b|req/s\b|items/s\b|clips/s\b"
    r"|images/s\b|%)"
)
GOAL = re.compile(r"\bgoal\b|\bgoals\b|<=|>=", re.I)  # a target is not a measurement


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of each section, code blocks and code spans removed."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", lambda m: m.group(0) if CITED.search(m.group(0)) else "", text)
    parts = re.split(r"^(#{1,6} .*)$", text, flags=re.M)
    return [("(top)", parts[0])] + [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def figures_without_log(path: Path) -> list[str]:
    """The paragraphs and table rows of ``path`` that state a measured figure and name no log, neither
    themselves nor in the paragraph just before them ("Measured (log X):" and its table or list)."""
    problems = []
    for heading, body in sections(path.read_text()):
        blocks = [b for b in re.split(r"\n\s*\n", body) if b.strip()]
        for i, block in enumerate(blocks):
            if NOT_MEASURED.search(block):
                continue
            before = (CITED.search(blocks[i - 1]) or NOT_MEASURED.search(blocks[i - 1])) if i else None
            is_table = all(line.lstrip().startswith("|") for line in block.strip().splitlines())
            pieces = block.strip().splitlines() if is_table else [block]
            for piece in pieces:
                if FIGURE.search(piece) and not GOAL.search(piece) and not CITED.search(piece) and not before:
                    line = next(x for x in piece.splitlines() if FIGURE.search(x))
                    problems.append(f"{path.name} / {heading}: {line.strip()[:120]!r} names no log")
    return problems


def log_problems(doc: Path) -> list[str]:
    problems = []
    for cited in sorted(set(CITED.findall(doc.read_text()))):
        log = ROOT / cited
        if not log.is_file():
            problems.append(f"{doc.name}: {cited} does not exist")
        elif not HEADER.match(log.read_text().split("\n", 1)[0]):
            problems.append(f"{doc.name}: {cited} does not start with its command and commit")
    return problems


def test_every_figure_in_the_readme_and_docs_names_a_log():
    assert [p for doc in DOCS if doc.name not in GENERATED for p in figures_without_log(doc)] == []


def test_every_cited_log_exists_and_names_its_command_and_commit():
    assert [p for doc in DOCS for p in log_problems(doc)] == []


def test_the_figure_check_can_fail(tmp_path):
    doc = tmp_path / "perf.md"
    doc.write_text(
        "# A\n\nIt runs 12.5x faster.\n\n# B\n\nGoal >= 2x.\n\n"
        "# C\n\n3.1 ms, log `benchmarks/results/x.log`\n\nWords.\n\n"
        "| a | 4 MiB |\n\n# D\n\nMeasured (log `benchmarks/results/x.log`):\n\n| a | 4 MiB |\n| b | 5 MiB |\n"
        "\n# E\n\nA cap of 16 MB. <!-- not measured: a limit -->\n"
    )
    assert [p.split(":")[0] for p in figures_without_log(doc)] == ["perf.md / # A", "perf.md / # C"]
    assert log_problems(doc) == ["perf.md: benchmarks/results/x.log does not exist"]
