"""retrieval's errors, in one place (the modules re-export the ones their callers catch)."""

from __future__ import annotations


class IndexError_(RuntimeError):
    """An index cannot be built, loaded or used (corrupt file, wrong model, budget too small)."""
