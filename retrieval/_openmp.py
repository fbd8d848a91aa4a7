"""Imported first by ``retrieval``: how the two OpenMP runtimes of a search process wait. torch and FAISS
each ship a copy of libgomp, and each reads the environment once, as it loads. Unless the user set
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` (then both runtimes get what was set):

- torch's threads spin 20,000 times, not libgomp's default 300,000, before they sleep at the end of a
  parallel region: the encoder's regions follow one another closely, but a long spin holds the cores
  the service's event loop and FAISS need;
- FAISS's threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``): its spinning after a search held the
  cores torch needed for the next query.

The environment is put back afterwards, so processes started later (the upload decoder) get it as
given. Measured on 2 cores on the 1M text->image index (A/B runs, not logged; the published figures are
in docs/retrieval.md): the in-process Searcher one query at a time, both runtimes at libgomp's default
62-66 q/s, FAISS passive 126-132, both passive 90-96, both active 25; the service at 32 clients with
torch at the default spin 382-404 req/s, at 20,000 422-439, both passive 375-403. Training
(``mmpretrain`` alone) is untouched.
"""

import os

_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_GIVEN = {key: os.environ.get(key) for key in _KEYS}
_OURS = all(value is None for value in _GIVEN.values())
if _OURS:
    os.environ["GOMP_SPINCOUNT"] = "20000"
import torch  # noqa: E402, F401  (torch's OpenMP runtime reads the environment now)

if _OURS:
    del os.environ["GOMP_SPINCOUNT"]
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
import faiss  # noqa: E402, F401  (FAISS's OpenMP runtime reads it here)

if _OURS:
    del os.environ["OMP_WAIT_POLICY"]
