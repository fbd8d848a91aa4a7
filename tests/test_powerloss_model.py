"""The power-loss model of the fault suite (``benchmarks/powerloss.py``) on traced writes: what it keeps
after a simulated power cut must be what was fsynced, so that its verdicts on checkpoints can fail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from powerloss import Disk, calls, have_strace, traced, unescape  # noqa: E402


def _can_trace() -> bool:
    if not have_strace():
        return False
    return subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "true"], capture_output=True).returncode == 0


needs_strace = pytest.mark.skipif(not _can_trace(), reason="needs strace allowed to trace (make system-deps)")

WRITERS = {
    # an atomic, durable write into folders made by makedirs_durable
    "durable": "from mmpretrain.utils.io import atomic_write_bytes\natomic_write_bytes(ROOT / 'a/b/f', DATA)",
    # the same atomic write, its folders made by a plain mkdir -p: the new folders' entries never reach disk
    "plain_mkdir": "import os\nfrom mmpretrain.utils.io import atomic_open\nos.makedirs(ROOT / 'a/b')\n"
    "with atomic_open(ROOT / 'a/b/f') as fh: fh.write(DATA)",
    # written and never fsynced
    "no_fsync": "(ROOT / 'a').mkdir()\n(ROOT / 'a/b').mkdir()\n(ROOT / 'a/b/f').write_bytes(DATA)",
    # fsynced data, then an unsynced rename over it
    "unsynced_rename": "import os\nfrom mmpretrain.utils.io import atomic_write_bytes\n"
    "atomic_write_bytes(ROOT / 'a/b/g', DATA)\nos.rename(ROOT / 'a/b/g', ROOT / 'a/b/f')",
}


def _survivor(tmp_path: Path, body: str) -> tuple[Path, Disk]:
    work = tmp_path / "work"
    work.mkdir()
    script = f"from pathlib import Path\nROOT = Path({str(work)!r})\nDATA = b'x' * 5000\n{body}\n"
    trace = tmp_path / "trace"
    cmd = traced([sys.executable, "-c", script], trace)
    subprocess.run(cmd, check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    disk = Disk(work, ROOT)
    for c in calls(trace):
        disk.apply(c)
    return work, disk


@needs_strace
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_power_cut_keeps_only_what_was_fsynced(tmp_path, writer):
    work, disk = _survivor(tmp_path, WRITERS[writer])
    assert (work / "a/b/f").read_bytes() == b"x" * 5000  # the page cache has it in every case
    node = disk.durable_node(work / "a/b/f")
    if writer == "durable":
        assert node is not None and node.synced == 5000
        assert disk.durable_node(work / "a/b/g") is None
    elif writer == "unsynced_rename":
        assert node is None and disk.durable_node(work / "a/b/g").synced == 5000  # the old name survives
    elif writer == "plain_mkdir":
        assert disk.durable_node(work / "a") is None  # the folder made by mkdir -p is lost, and f with it
    else:
        assert node is None or node.synced == 0


def test_the_trace_parser_rejoins_calls_decodes_paths_and_reports_what_it_cannot_model(tmp_path):
    """strace's interrupted calls, escaped paths, fds of deleted files, ftruncate's length, and a file
    the trace never created (made by an untraced call): a model gap, not a file guessed durable."""
    w = tmp_path
    trace = tmp_path / "t"
    trace.write_text(
        f'1  mkdir("{w}/ck", 0777 <unfinished ...>\n'
        f'2  write(1</dev/null>, "x", 1) = 1\n'
        f"1  <... mkdir resumed>) = 0\n"
        f'1  openat(AT_FDCWD<{w}>, "{w}/ck/\\303\\251", O_WRONLY|O_CREAT, 0666) = 3<{w}/ck/\\303\\251>\n'
        f"1  ftruncate(3<{w}/ck/\\303\\251>, 4096) = 0\n"
        f"1  fsync(3<{w}/ck/\\303\\251>) = 0\n"
        f"1  fsync(4<{w}/ck>) = 0\n"
        f"1  fsync(7<{w}>) = 0\n"
        f"1  fsync(5<{w}/ck/gone>(deleted)) = 0\n"
        f"1  fsync(6<{w}/ck/linked>) = 0\n"
        f'1  unlink("{w}/nothing") = -1 ENOENT (No such file or directory)\n'
    )
    assert unescape("\\303\\251") == "\u00e9"
    disk = Disk(w, w, watch=w / "ck")
    for c in calls(trace):
        disk.apply(c)
    assert disk.durable_node(w / "ck" / "\u00e9").synced == 4096
    assert disk.durable_node(w / "ck" / "gone") is None
    assert disk.phantoms == [str(w / "ck" / "linked")]
