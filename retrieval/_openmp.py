"""Imported first by ``retrieval``: FAISS's OpenMP threads sleep as soon as a parallel region ends
(``OMP_WAIT_POLICY=PASSIVE`` while FAISS loads its own OpenMP runtime) instead of spinning, while
torch's runtime, loaded before it, keeps the policy the environment gives (OpenMP's default: spin a
while). A user's ``OMP_WAIT_POLICY`` applies to both, as set.

A search runs torch (the query encoder) and then FAISS, each with its own OpenMP team (two copies of
libgomp, one in each wheel); FAISS's threads spinning after a search hold the cores torch's threads
need for the next query. The in-process Searcher on the 1M text->image index, one query at a time, on
2 cores (300 queries, two runs each): both runtimes default 62-66 q/s (serve_load's peer), FAISS's
passive 131-132, both passive 90-96, both active 25. Training (``mmpretrain`` alone) is untouched.
"""

import os

import torch  # noqa: F401  (torch's OpenMP runtime reads the policy now, from the environment as given)

_GIVEN = os.environ.get("OMP_WAIT_POLICY")
if _GIVEN is None:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
import faiss  # noqa: E402, F401  (FAISS's OpenMP runtime reads it here: passive unless the user set one)

if _GIVEN is None:
    del os.environ["OMP_WAIT_POLICY"]  # processes started later (the upload decoder) get the environment as given
