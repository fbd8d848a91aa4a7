"""The index folder's file checksums: recorded at build (``index.json`` ``checksums``) and verified on
open, with the last successful check of each file remembered by (size, mtime, inode) in
``.verified.json``, so an unchanged file is only stat'ed (opening a 520 GB index does not read it all
again) while a file written since is hashed again. A read-only folder keeps no record."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mmpretrain import api

log = logging.getLogger(__name__)
VERIFIED = ".verified.json"  # (size, mtime, inode, sha256) of each file when its sha256 last matched


def record(folder: Path, files: list[str]) -> dict[str, str]:
    """The sha256 of each of ``files`` in ``folder`` (what ``index.json`` records)."""
    return {f: api.files.sha256_file(folder / f) for f in files}


def problem(folder: Path, checksums: dict[str, str], *, deep: bool) -> str | None:
    """None when every file listed is there and (``deep``) matches its sha256, else what is wrong.
    ``rm FOLDER/.verified.json`` forces every file to be hashed again."""
    try:
        seen = json.loads((folder / VERIFIED).read_text())
    except (OSError, ValueError):
        seen = {}
    now = {}
    for name, digest in checksums.items():
        path = folder / name
        if not path.is_file():
            return f"{folder}/{name} is missing"
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, digest]
        if deep and seen.get(name) != stamp and api.files.sha256_file(path) != digest:
            return f"{folder}/{name} is corrupt (sha256 mismatch); rebuild the index"
        now[name] = stamp
    if deep and now != seen:
        try:
            api.files.atomic_write_text(folder / VERIFIED, json.dumps(now))
        except OSError:
            log.info("%s is read-only: its files' checksums are verified on every open", folder)
    return None
