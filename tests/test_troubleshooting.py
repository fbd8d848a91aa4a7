"""docs/troubleshooting.md stays true: every error message it quotes (the backticked text in a table
row's first column) is one the code can print. The message's literal text, its placeholders (``...``,
``{x}``, ``<x>``, a quoted ``'value'``, an ALL-CAPS word such as ``PATH`` or ``N``, a number) standing
for any text, must describe the same text as a string literal of ``mmpretrain/`` or ``retrieval/``, whose
interpolations (``{x}`` in f-strings and ``.format``, ``%s`` in log calls) stand for any text, read from
the start of the message (quoted messages are starts; a composed message may have a prefix); and most
of the message's literal text (``MIN_LITERAL``) must be the code's own literal text, not something an
interpolation could be."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "troubleshooting.md"
NOT_MESSAGES = {"torchrun: command not found", "rsvg-convert not found", "npm not found"}  # the shell's, not ours
PLACEHOLDER = re.compile(r"\.\.\.|\{[^{}]*\}|<[^<>]+>|'[^']*'|\b[A-Z][A-Z0-9_]*\b|\b\d[\d.]*\b|\([^)]*\.\.\.[^)]*\)")
INTERPOLATION = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdrfgx]|\{[^{}]*\}")
ANY = "\x00"  # a placeholder or an interpolation: any text
MIN_LITERAL = 0.6  # of a message's literal characters, matched by the code's literal characters


def quoted_messages(page: Path) -> list[str]:
    out = []
    for line in page.read_text().splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            out += [m for m in re.findall(r"`([^`]+)`", first) if m not in NOT_MESSAGES]
    return out


def fold(text: str) -> str:
    return " ".join(text.split())  # whitespace folded: messages span lines


def code_strings(sources: list[str]) -> list[str]:
    """Every string literal of ``sources`` (implicit concatenations joined by the parser), each
    interpolation replaced by ``ANY``."""
    out = []
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.JoinedStr):
                out.append("".join(v.value if isinstance(v, ast.Constant) else ANY for v in node.values))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append(INTERPOLATION.sub(ANY, node.value))
    return [fold(s) for s in out if len(s.replace(ANY, "").strip()) >= 10]


def template(message: str) -> str:
    """The message with ``ANY`` for each placeholder, and before (a prefix) and after it (a start)."""
    return ANY + ANY.join(PLACEHOLDER.split(fold(message))) + ANY


def literal_match(a: str, b: str) -> int:
    """The most literal characters of template ``a`` matched by literal characters of template ``b``
    over the ways both describe one text (``ANY``: any text); -1 when they describe none in common."""
    n, m = len(a), len(b)
    below = [-1] * (m + 1)  # row i + 1 of the table; row n: only ANYs of b left
    below[m] = 0
    for j in range(m - 1, -1, -1):
        below[j] = below[j + 1] if b[j] == ANY else -1
    for i in range(n - 1, -1, -1):
        row = [-1] * (m + 1)
        for j in range(m, -1, -1):
            best = -1
            if a[i] == ANY:  # takes nothing more, or b's next character
                best = max(below[j], row[j + 1] if j < m else -1)
            if j < m and b[j] == ANY:
                best = max(best, row[j + 1], below[j])
            if j < m and a[i] != ANY and a[i] == b[j] and below[j + 1] >= 0:
                best = max(best, below[j + 1] + 1)
            row[j] = best
        below = row
    return below[0]


def missing(messages: list[str], strings: list[str]) -> list[str]:
    """The messages no string of the code prints."""
    out = []
    for message in messages:
        a = template(message)
        need = MIN_LITERAL * len(a.replace(ANY, ""))
        pieces = [p.split() for p in PLACEHOLDER.split(fold(message))]
        runs = {" ".join(w[i : i + 2]) for w in pieces for i in range(len(w) - 1)} or {x for w in pieces for x in w}
        candidates = [s for s in strings if any(r in s for r in runs)]  # cheap first: shares two words
        if not any(literal_match(a, s) >= need for s in candidates):
            out.append(message)
    return out


def source_strings() -> list[str]:
    files = [*(ROOT / "mmpretrain").rglob("*.py"), *(ROOT / "retrieval").rglob("*.py")]
    return code_strings([f.read_text() for f in files])


def test_every_quoted_error_message_is_in_the_code():
    messages = quoted_messages(PAGE)
    assert len(messages) > 20
    assert missing(messages, source_strings()) == []


def test_the_message_check_can_fail():
    code = code_strings(
        [
            "raise X(f'no checkpoint at {p} (expected one of ours)')\n"
            "log.warning('skipped %s shards: %s', n, why)\n"
            "raise E(f'{where}: unknown encoder {name!r}')"
        ]
    )
    assert missing(
        [
            "no checkpoint at PATH",  # the placeholder covers the interpolation
            "no checkpoint at ...",
            "skipped N shards: ...",
            "WHERE: unknown encoder 'x'",  # a composed message: its prefix a placeholder
            "the flux capacitor is empty",  # nowhere
            "no checkpoints at PATH",  # one word changed: three consecutive words still match
            "skipped N shards because the disk is full",  # literal text an interpolation alone could be
        ],
        code,
    ) == ["the flux capacitor is empty", "no checkpoints at PATH", "skipped N shards because the disk is full"]
