"""The sentence readers of the real-text index benchmark (``benchmarks/sentences.py``): what they keep
is prose, not markup, headwords or citations, so the 1M-vector set is made of sentences."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from sentences import dict_sentences, html_sentences, rst_sentences  # noqa: E402

GCIDE = """Abdomen \\Ab*do"men\\, n. [L. abdomen (a word of uncertain
   etymol.): cf. F. abdomen.]
   1. (Anat.) The belly, or that part of the body between the
      thorax and the pelvis. Also, the cavity of the belly,
      which is lined by the peritoneum, and contains the stomach.
      [1913 Webster]

Abdicator \\Ab"di*ca`tor\\, n.
   One who abdicates his throne or high office. --Bailey.
   [1913 Webster]

   {Abdominal ring} (Anat.), a fancied ringlike opening on each side.
      [1913 Webster]
"""


def test_dictionary_definitions_lose_headwords_labels_and_citations():
    got = dict_sentences(GCIDE)
    assert "The belly, or that part of the body between the thorax and the pelvis." in got
    assert "Also, the cavity of the belly, which is lined by the peritoneum, and contains the stomach." in got
    assert "One who abdicates his throne or high office." in got
    assert not any("Webster" in s or "Bailey" in s or "*" in s or "\\" in s or "{" in s for s in got)
    assert not any(s[0].islower() for s in got)  # the etymology's continuation line is not a sentence


def test_javadoc_blocks_and_paragraphs_are_read_code_is_not():
    page = (
        '<div class="block">Returns the first annotation for the <code>specified</code> type if one '
        "exists.</div><pre>int x = compute(a, b, c, d, e, f);</pre>"
        "<p>The filter is expressed as a formula that should be applied to the first column.</p>"
    )
    assert html_sentences(page) == [
        "Returns the first annotation for the specified type if one exists.",
        "The filter is expressed as a formula that should be applied to the first column.",
    ]


def test_rst_prose_only():
    text = "Title\n=====\n\nA paragraph of plain prose that has more than six words.\n\n    code = 1 + 2 + 3 + 4 + 5\n"
    assert rst_sentences(text) == ["A paragraph of plain prose that has more than six words."]
