"""retrieval's errors, in one place (the modules re-export the ones their callers catch)."""

from __future__ import annotations


class IndexError_(RuntimeError):
    """An index cannot be built, loaded or used (corrupt file, wrong model, budget too small)."""


class QueryError(ValueError):
    """A query that cannot be answered (empty, too long, k out of range, not UTF-8)."""


class QueryError_(ValueError):
    """Tuning queries that cannot be made as asked (no captions, the model is not the job's)."""


class EmbedError(RuntimeError):
    """An embedding job cannot run or continue (with what to do about it)."""


class FetchError(Exception):
    """A fetch refused or failed; the message says why (log it, do not show it to the client)."""
