"""The offline jobs: embedding (``embed``), FAISS indexes (``index``, ``index_types``, ``queries``), search
(``search``), curation (``curate``) and the Ray engines (``engines``). Never imports ``retrieval.serve``."""

from retrieval.jobs import (
    curate,  # noqa: F401  (registers the dedup keep rules)
    engines,  # noqa: F401  (registers the "ray" engines; Ray is imported only when used)
)
