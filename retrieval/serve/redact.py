"""What HTTP may show of an item's source: never a command line, a credential or an absolute server
path (``public_source``), and the collection root that local paths are shown relative to."""

from __future__ import annotations

import os
import re
from pathlib import PurePosixPath
from urllib.parse import urlsplit

URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def public_url(url: str) -> str:
    """``scheme://host[:port]/path`` of a URL: no user, password, query (signatures, tokens) or fragment."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def public_source(source: str, root: str | None) -> str:
    """What HTTP may show of an item's source: never a command line, a credential or an absolute
    server path. A ``pipe:`` command shows only the URL it fetches (or the file name); a URL loses
    its user, password and query; a local path is shown relative to the collection ``root`` (else by
    its file name). Our ``#key`` suffix is kept."""
    body, hash_, key = source.rpartition("#") if "#" in source else (source, "", "")
    if body.startswith("pipe:"):
        urls = URL.findall(body)
        shown = public_url(urls[-1]) if urls else PurePosixPath(body.split()[-1].strip("'\"")).name
    elif URL.fullmatch(body):
        shown = public_url(body)
    else:
        path = PurePosixPath(body)
        rel = _relative(path, root) if path.is_absolute() else (path if ".." not in path.parts else None)
        shown = str(rel) if rel is not None else path.name
    return shown + hash_ + key


def _relative(path: PurePosixPath, root: str | None) -> PurePosixPath | None:
    try:
        return path.relative_to(root) if root else None
    except ValueError:
        return None


def collection_root(sources: list[str]) -> str | None:
    """The deepest folder holding every local absolute source (shards or image files); None when that
    is ``/`` (one item at the top would otherwise show every other item's whole path): file names then."""
    folders = {
        str(PurePosixPath(s.rpartition("#")[0] or s).parent) for s in sources if s.startswith("/") and not URL.match(s)
    }
    root = os.path.commonpath(sorted(folders)) if folders else None
    return root if root and root != "/" else None
