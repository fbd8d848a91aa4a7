"""Durable, atomic file writes: write under a temp name in the same directory, fsync the data,
rename into place, fsync the directory. A crash (or power cut) at any point leaves either the old
file or folder or the new one, never a torn one under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from mmpretrain.utils.faults import crash_point


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success it replaces ``path`` atomically and durably.

    On an exception the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    makedirs_durable(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (``atomic_open``)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (``atomic_open``)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory that is renamed to ``path`` when the block succeeds.

    Before the rename every file and folder inside is fsynced, so the renamed folder is complete on
    disk. An existing ``path`` is replaced only then (moved aside, the new one renamed in, the old
    one deleted); a failed block leaves ``path`` as it was and no temp directory behind.
    """
    path = Path(path)
    makedirs_durable(path.parent)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        fsync_tree(tmp)
        crash_point("atomic_dir.synced")
        old = path.with_name(f".{path.name}.old-{os.getpid()}") if path.exists() else None
        if old is not None:
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)  # put the old one back: path is never left missing
            raise
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_tree(path: str | Path) -> None:
    """Delete a folder so that a crash midway never leaves it half-deleted under its own name:
    it is renamed to a hidden name first (durably), then removed."""
    path = Path(path)
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    os.replace(path, doomed)
    fsync_dir(path.parent)
    crash_point("remove_tree.renamed")
    shutil.rmtree(doomed, ignore_errors=True)


def makedirs_durable(path: str | Path) -> Path:
    """``mkdir -p`` whose new folders survive a power cut: each folder made is fsynced into its parent.
    (A new folder's entry is durable only once its parent is fsynced; without this, a run folder made
    just before its first checkpoint could vanish with every checkpoint in it: the power-loss section
    of ``benchmarks/faults.py`` found it.)"""
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
        fsync_dir(folder.parent)
    if not missing:
        fsync_dir(path.parent)  # made earlier by someone else (mkdir -p, a run killed before its fsync)
    return path


def fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root``, then every folder (deepest first)."""
    dirs = []
    for folder, _, files in os.walk(root):
        dirs.append(folder)
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for folder in reversed(dirs):
        fsync_dir(Path(folder))


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable. A filesystem that cannot open or fsync a
    folder is let be; an I/O error (EIO, ENOSPC) is raised, not hidden."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
