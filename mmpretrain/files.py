"""Durable, atomic file writes (public): what every artifact of mmpretrain is written with, for
tools built on it (``retrieval`` reaches them as ``api.files``).

Each writes under a temp name beside the target, fsyncs the data, renames into place and fsyncs
the folder: a crash or power cut leaves the old file or folder or the new one, never a torn one.

    >>> from mmpretrain.api import files
    >>> files.atomic_write_text("out/index.json", "{}")
    >>> with files.atomic_dir("out/index") as tmp:      # a whole folder appears at once
    ...     (tmp / "index.faiss").write_bytes(b"...")
"""

from mmpretrain.utils.io import atomic_dir, atomic_open, atomic_write_bytes, atomic_write_text, sha256_file

__all__ = ["atomic_dir", "atomic_open", "atomic_write_bytes", "atomic_write_text", "sha256_file"]
