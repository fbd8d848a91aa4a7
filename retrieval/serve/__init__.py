"""The search service: FastAPI app (``service``, ``routes``), the batching engine (``engine``, ``batcher``),
the guards at the boundary (``guards``, ``connections``, ``uploads``, ``fetch``, ``redact``) and
clip-retrieval's protocol (``protocol``). Uses ``retrieval.jobs`` (the Searcher), never the reverse."""
