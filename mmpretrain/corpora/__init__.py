"""Benchmark corpora built offline from real data: emoji (npm emoji sets), icons (Debian icon themes),
motion (emoji in motion with spoken names; video-audio-text). Each registers its builder in
``CORPORA`` (``base``); importing the package registers all of them, so ``CORPORA`` is complete
wherever it is read. Nothing in ``data/`` or below imports this package.
"""

from mmpretrain.corpora import emoji, icons, motion  # noqa: F401,E402  (register the built-in corpora)
from mmpretrain.corpora.base import CORPORA, RASTERIZERS, CorpusError, seeded_split, write_corpus  # noqa: F401
