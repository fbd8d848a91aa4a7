"""Debian packages as offline data sources: ``apt-get download`` (no root, nothing installed) and
``dpkg-deb -x`` into a cache, with the version and licence of each (the icon themes; espeak-ng)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

from mmpretrain.corpora.base import CorpusError
from mmpretrain.utils.io import atomic_write_text


def fetch_debs(packages: tuple[str, ...], cache: Path, pins: dict | None = None) -> dict[str, dict]:
    """Download and unpack each package once into ``cache/root/<pkg>``; returns name/version/licence.
    ``pins``: package -> (version, sha256 of its .deb), checked (a cached copy too) and the sha256
    recorded; a package that does not match is refused."""
    out = {}
    for pkg in packages:
        root, deb_dir = cache / "root" / pkg, cache / "deb"
        if not (root / ".unpacked").is_file():
            deb = _download_deb(pkg, deb_dir)
            tmp = root.with_name(pkg + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
            info = {"name": pkg, "version": _deb_field(deb, "Version"), "license": licence(tmp, pkg)}
            atomic_write_text(tmp / ".unpacked", json.dumps(info))
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
        out[pkg] = json.loads((root / ".unpacked").read_text())
        if pins and pkg in pins:
            out[pkg] = _check_pin(pkg, out[pkg], cache / "deb", pins[pkg])
    return out


def _check_pin(pkg: str, info: dict, deb_dir: Path, pin: tuple[str, str]) -> dict:
    version, digest = pin
    debs = sorted(deb_dir.glob(f"{pkg}_*.deb"))
    got = hashlib.sha256(debs[-1].read_bytes()).hexdigest() if debs else "no .deb in the cache"
    if info["version"] != version or got != digest:
        raise CorpusError(f"{pkg}: got {info['version']} ({got}), pinned {version} ({digest}): bump the pin")
    return {**info, "sha256": got}


def _download_deb(pkg: str, deb_dir: Path) -> Path:
    have = sorted(deb_dir.glob(f"{pkg}_*.deb"))
    if have:
        return have[-1]
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusError(f"{tool} not found: the icon corpus needs a Debian/Ubuntu machine (apt) to fetch {pkg}")
    deb_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["apt-get", "download", pkg], cwd=deb_dir, capture_output=True, text=True)
    have = sorted(deb_dir.glob(f"{pkg}_*.deb"))
    if proc.returncode != 0 or not have:
        raise CorpusError(
            f"`apt-get download {pkg}` failed ({proc.stderr.strip()[-300:]}); run `apt-get update` "
            f"(as root) so apt knows the package, or drop it from the config's packages"
        )
    return have[-1]


def _deb_field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True).stdout.strip()


def licence(root: Path, pkg: str) -> str:
    """The licence names of the package's Debian copyright file (``License:`` fields)."""
    copyright_file = root / "usr" / "share" / "doc" / pkg / "copyright"
    if not copyright_file.is_file():
        return "unknown"
    names = re.findall(r"^License:\s*(\S.*)$", copyright_file.read_text(errors="replace"), re.M)
    return ", ".join(dict.fromkeys(n.strip() for n in names)) or "see copyright"
