"""docs/troubleshooting.md stays true: every error message it quotes (the backticked text in a table
row's first column) is one the code can print: some run of three consecutive words (two, in a message
with no longer piece) of its literal text, between the placeholders (NAME, N, '...'), appears in the
source of ``mmpretrain/`` or ``retrieval/`` (messages are composed: their variable parts are not searched)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "troubleshooting.md"
NOT_MESSAGES = {"torchrun: command not found", "rsvg-convert not found", "npm not found"}  # the shell's, not ours
PLACEHOLDER = re.compile(r"\.\.\.|'[^']*'|\b[A-Z][A-Z0-9_]*\b|\b\d[\d.]*\b|\([^)]*\.\.\.[^)]*\)")


def quoted_messages(page: Path) -> list[str]:
    out = []
    for line in page.read_text().splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            out += [m for m in re.findall(r"`([^`]+)`", first) if m not in NOT_MESSAGES]
    return out


def word_runs(message: str, n: int = 3) -> list[str]:
    """Every run of ``n`` consecutive words within the pieces of ``message`` between its placeholders."""
    runs = []
    for piece in PLACEHOLDER.split(message):
        words = piece.strip(" .:;,()").split()
        runs += [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    return runs


def source_text() -> str:
    files = [*(ROOT / "mmpretrain").rglob("*.py"), *(ROOT / "retrieval").rglob("*.py")]
    return "\n".join(" ".join(f.read_text().split()) for f in files)  # whitespace folded: messages span lines


def missing(messages: list[str], source: str) -> list[str]:
    source = source.replace('" "', " ")  # implicit concatenation of string literals
    return [m for m in messages if not any(run in source for run in word_runs(m) or word_runs(m, 2))]


def test_every_quoted_error_message_is_in_the_code():
    messages = quoted_messages(PAGE)
    assert len(messages) > 20
    assert missing(messages, source_text()) == []


def test_the_message_check_can_fail():
    assert missing(["no checkpoint at PATH", "the flux capacitor is empty"], "raise X(f'no checkpoint at {p}')") == [
        "the flux capacitor is empty"
    ]
