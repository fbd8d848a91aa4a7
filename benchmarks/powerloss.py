"""Power-loss simulation for the fault suite (``benchmarks/faults.py --sections powerloss``).

A ``kill -9`` keeps everything the process wrote (the page cache survives); a power cut keeps only
what was fsynced. To see the difference, a training run is traced with ``strace`` (every create,
write, fsync, rename and unlink, with the paths of their file descriptors), and the trace is replayed
on a model of the disk in the strict POSIX sense, as ALICE (Pillai et al., OSDI 2014) models file
systems:

* a file's bytes are durable up to its size at its last ``fsync``/``fdatasync``;
* a directory entry (a create, rename or unlink in that directory) is durable once that directory is
  fsynced after it; ``sync``/``syncfs`` make everything durable.

After every fsync the durable state is a crash state: the run's ``checkpoints/`` folder as a power cut
at that moment would leave it is built on disk (each file's content taken from a reference run that
kept every checkpoint, cut to its durable length) and handed to the real ``find_latest``; some of those
states are resumed to the end with the real CLI. The content model needs the traced run to write the
same bytes as the reference run (training is deterministic; the suite checks the final checkpoint's
hashes, but for a sharded checkpoint's ``.metadata``: a random id and its path) and every checkpoint
file to be written once (checked: a write after an fsync is reported).

Limits: per fsync it checks the one state where nothing unsynced survived, not the states where some
unsynced operations did (ALICE explores those too; here every unsynced operation works on hidden
temp names, which ``clean_stale`` removes); an fsync counts from the moment it returned; a path under
``checkpoints/`` used but never made by a traced call (link, O_TMPFILE) is reported as a model gap.

Needs ``strace`` (``apt-get install strace``; ``make bench-faults`` installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SYSCALLS = (
    "open,openat,creat,write,pwrite64,writev,pwritev,pwritev2,ftruncate,fsync,fdatasync,sync,syncfs,"
    "rename,renameat,renameat2,mkdir,mkdirat,unlink,unlinkat,rmdir"
)
LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+)(?:<([^>]*)>)?")
UNFINISHED = re.compile(r"^(\d+)\s+(.*) <unfinished \.\.\.>$")
RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")
FD = re.compile(r"(?:\d+|AT_FDCWD)<((?:[^>\\]|\\.)*)>(\(deleted\))?")
STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
STEP = re.compile(r"step_(\d{8})")
# differ between two runs that wrote the same tensors: torch.distributed.checkpoint's .metadata holds a
# random save id and the path it was saved to (the reference's copy loads the same; the shards match)
VOLATILE = frozenset({"sharded/.metadata"})
SAVED = re.compile(r"saved checkpoint \S*step_(\d{8})")


def have_strace() -> bool:
    return shutil.which("strace") is not None


def traced(cmd: list[str], trace: Path) -> list[str]:
    """``cmd`` under strace, following every child (torchrun's ranks too), writing ``trace``."""
    return ["strace", "-f", "-qq", "-y", "-s", "400", "-o", str(trace), "-e", f"trace={SYSCALLS}", *cmd]


@dataclass(frozen=True)
class Call:
    pid: int
    name: str
    fds: list[str]  # the paths of the fd arguments, in order
    strings: list[str]  # the quoted arguments, in order
    args: str  # the arguments as strace printed them (flags)
    ret: int
    ret_path: str | None
    deleted: bool = False  # the first fd's file was unlinked (its data no longer matters)


def unescape(text: str) -> str:
    """A path as strace printed it (C escapes for odd bytes, octal for non-ASCII) as Python has it."""
    raw = text.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1")
    return raw.decode("utf-8", "surrogateescape")


def calls(trace: Path) -> Iterator[Call]:
    """The successful calls of an ``strace -f -y`` trace, with interrupted calls rejoined."""
    pending: dict[str, str] = {}
    for raw in trace.read_text(errors="replace").splitlines():
        if m := UNFINISHED.match(raw):
            pending[m.group(1)] = m.group(2)
            continue
        if (m := RESUMED.match(raw)) and m.group(1) in pending:
            raw = f"{m.group(1)} {pending.pop(m.group(1))}{m.group(3)}"
        m = LINE.match(raw)
        if m is None or int(m.group(4)) < 0:
            continue
        args = m.group(3)
        fds = FD.findall(args)
        yield Call(
            int(m.group(1)),
            m.group(2),
            [unescape(path) for path, _ in fds],
            [unescape(x) for x in STRING.findall(args)],
            args,
            int(m.group(4)),
            unescape(m.group(5)) if m.group(5) else None,
            bool(fds and fds[0][1]),
        )


@dataclass(eq=False)
class Node:
    """An inode: a file's written and durable lengths, or a directory's live and durable entries."""

    dir: bool
    origin: str  # the path it was created or last renamed to (names its content)
    written: int = 0
    synced: int = 0
    rewritten: bool = False  # written again after an fsync: the content model cannot rebuild it
    live: dict[str, Node] = field(default_factory=dict)
    durable: dict[str, Node] = field(default_factory=dict)
    pending: list[tuple[str, Node | None]] = field(default_factory=list)

    def commit(self) -> None:
        for name, node in self.pending:
            if node is None:
                self.durable.pop(name, None)
            else:
                self.durable[name] = node
        self.pending.clear()


class Disk:
    """The strict model of the file system under ``root`` (which exists, durably, before the trace)."""

    def __init__(self, root: Path, cwd: Path, watch: Path | None = None):
        self.root, self.cwd, self.watch = Path(root), Path(cwd), watch
        self.phantoms: list[str] = []  # paths under ``watch`` first seen in use, never created: model gaps
        self.top = Node(True, str(root))
        self.saved: int | None = None  # the newest step whose "saved checkpoint" was logged
        self.nodes: list[Node] = []  # every node made during the trace, deleted ones too

    def _parts(self, path: str, base: str | None = None) -> list[str] | None:
        p = Path(path) if os.path.isabs(path) else Path(base or self.cwd) / path
        p = Path(os.path.normpath(p))
        return list(p.relative_to(self.root).parts) if p.is_relative_to(self.root) else None

    def _walk(self, parts: list[str], make: bool = True) -> Node | None:
        """The live node at ``parts``; a path never seen before existed before the trace (durable)."""
        node = self.top
        for i, name in enumerate(parts):
            if name not in node.live:
                if not make:
                    return None
                seen = Node(True, str(self.root.joinpath(*parts[: i + 1])))  # file or folder: fsync treats both
                if self.watch is not None and Path(seen.origin).is_relative_to(self.watch):
                    self.phantoms.append(seen.origin)  # an untraced call made it (link, O_TMPFILE, ...)
                node.live[name] = node.durable[name] = seen
            node = node.live[name]
        return node

    def _entry(self, path: str, base: str | None = None) -> tuple[Node, str] | None:
        parts = self._parts(path, base)
        if not parts:
            return None
        return self._walk(parts[:-1]), parts[-1]

    def _create(self, path: str, is_dir: bool, base: str | None = None) -> None:
        entry = self._entry(path, base)
        if entry is None:
            return
        parent, name = entry
        node = Node(is_dir, os.path.normpath(path if os.path.isabs(path) else os.path.join(base or self.cwd, path)))
        self.nodes.append(node)
        parent.live[name] = node
        parent.pending.append((name, node))

    def _remove(self, path: str, base: str | None = None) -> Node | None:
        entry = self._entry(path, base)
        if entry is None or entry[1] not in entry[0].live:
            return None
        parent, name = entry
        parent.pending.append((name, None))
        return parent.live.pop(name)

    def apply(self, c: Call) -> bool:
        """Replay one call; True when the durable state may have changed."""
        if c.name == "write" and c.strings and (m := SAVED.search(c.strings[0])):
            self.saved = int(m.group(1))  # the log line written once save_checkpoint returned
            return True
        if c.name in ("open", "openat", "creat"):
            parts = self._parts(c.ret_path or "")
            if parts is None or not c.ret_path:
                return False
            node = self._walk(parts, make=False)
            if node is None and (c.name == "creat" or "O_CREAT" in c.args):
                self._create(c.ret_path, False)
            elif node is not None and (c.name == "creat" or "O_TRUNC" in c.args):
                node.rewritten = node.rewritten or node.synced > 0
                node.written = 0
            return False
        if c.name in ("write", "pwrite64", "writev", "pwritev", "pwritev2", "ftruncate") and c.fds and not c.deleted:
            parts = self._parts(c.fds[0])
            if parts is None:
                return False
            node = self._walk(parts)
            node.rewritten = node.rewritten or (node.synced > 0 and node.written == node.synced)
            node.written = int(c.args.rsplit(",", 1)[-1]) if c.name == "ftruncate" else node.written + c.ret
            return False
        if c.name in ("fsync", "fdatasync") and c.fds and not c.deleted:
            parts = self._parts(c.fds[0])
            if parts is None:
                return False
            node = self._walk(parts)
            node.commit()  # a folder's entries (nothing, for a file)
            node.synced = node.written  # a file's bytes (nothing, for a folder)
            return True
        if c.name in ("sync", "syncfs"):
            self._sync_all(self.top)
            return True
        return self._namespace(c)

    def _namespace(self, c: Call) -> bool:
        base = c.fds[0] if c.fds else None
        if c.name in ("mkdir", "mkdirat") and c.strings:
            self._create(c.strings[0], True, base)
        elif c.name in ("unlink", "unlinkat", "rmdir") and c.strings:
            self._remove(c.strings[0], base)
        elif c.name in ("rename", "renameat", "renameat2") and len(c.strings) == 2:
            dst_base = c.fds[1] if len(c.fds) > 1 else base
            node = self._remove(c.strings[0], base)
            entry = self._entry(c.strings[1], dst_base)
            if node is not None and entry is not None:
                node.origin = os.path.normpath(os.path.join(dst_base or self.cwd, c.strings[1]))  # its content's name
                entry[0].live[entry[1]] = node
                entry[0].pending.append((entry[1], node))
        return False

    def _sync_all(self, node: Node) -> None:
        node.synced = node.written
        node.commit()
        for child in node.live.values():
            self._sync_all(child)

    def durable_node(self, path: Path) -> Node | None:
        node = self.top
        for name in Path(path).relative_to(self.root).parts:
            node = node.durable.get(name)
            if node is None:
                return None
        return node


def rebuild(node: Node, out: Path, content_of) -> int:
    """Write the durable tree of ``node`` at ``out``: each file cut to its durable length, its content
    from ``content_of(node)`` (a path). Returns the number of files cut short."""
    out.mkdir(parents=True, exist_ok=True)
    short = 0
    for name, child in node.durable.items():
        target = out / name
        if child.dir:
            short += rebuild(child, target, content_of)
            continue
        source = content_of(child)
        if source is not None and child.synced >= child.written:
            os.link(source, target)  # all it was written is durable: the whole file, no copy
        else:
            data = source.read_bytes()[: child.synced] if source is not None else b""
            target.write_bytes(data)
            short += 1
    return short


def reference_store(ref_checkpoints: Path, config_yaml: Path, store: Path) -> Path:
    """Every checkpoint the traced run wrote, rebuilt from the reference run's: its weights and state
    (linked), the traced run's resolved config (which differs in run_dir and keep_last) and the
    checksums ``write_checksums`` makes of them, as the traced run made its own."""
    from mmpretrain.models.layout import CHECKSUMS, list_checkpoints, step_of, write_checksums

    for ckpt in list_checkpoints(ref_checkpoints.parent):
        out = store / ckpt.name
        for f in ckpt.rglob("*"):
            rel = f.relative_to(ckpt)
            if f.is_dir() or rel.as_posix() in (CHECKSUMS, "config.yaml"):
                continue
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(f, out / rel)
        shutil.copy(config_yaml, out / "config.yaml")
        write_checksums(out, step_of(ckpt))
    return store


def reference_content(ref_checkpoints: Path, traced_checkpoints: Path):
    """``content_of`` for ``rebuild``: a file first written as ``checkpoints/<any name with
    step_XXXXXXXX>/<inner>`` has the bytes of the reference run's ``step_XXXXXXXX/<inner>``."""
    traced_checkpoints = str(traced_checkpoints)

    def content_of(node: Node) -> Path | None:
        if not node.origin.startswith(traced_checkpoints + os.sep):
            return None
        rel = Path(node.origin[len(traced_checkpoints) + 1 :])
        m = STEP.search(rel.parts[0])
        if m is None:
            return None
        path = ref_checkpoints / f"step_{m.group(1)}" / Path(*rel.parts[1:])
        return path if path.is_file() else None

    return content_of


def crash_states(trace: Path, disk: Disk, checkpoints: Path) -> Iterator[int]:
    """Replays ``trace`` on ``disk``, yielding the call index after each call that may change the durable
    state of ``checkpoints`` (one state per distinct durable layout and newest saved step); ``disk`` is
    that state when yielded, and the trace's end state once the loop is done."""
    last = None
    for i, c in enumerate(calls(trace)):
        if not disk.apply(c):
            continue
        node = disk.durable_node(checkpoints)
        key = (disk.saved, _signature(node))
        if key != last:
            last = key
            yield i


def _signature(node: Node | None) -> tuple:
    if node is None:
        return ()
    return tuple(
        (name, _signature(child) if child.dir else (child.synced, id(child))) for name, child in node.durable.items()
    )


def strace_run(cmd: list[str], trace: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(traced(cmd, trace), capture_output=True, text=True, **kwargs)


# ------------------------------------------------------------------ the suite
def powerloss_suite(work: Path, shards: Path, resumes: int = 8, strategies=("ddp", "fsdp")) -> dict:
    """Per strategy: one traced run (keep_last 1, so pruning is in the trace); every crash state of its
    checkpoints folder rebuilt and given to ``find_latest``; ``resumes`` of them (spread over the run)
    resumed to the end."""
    if not have_strace():
        raise SystemExit("the power-loss section needs strace: apt-get install strace (make bench-faults does)")
    return {s: _powerloss_run(work, shards, s, resumes) for s in strategies}


def _powerloss_run(work: Path, shards: Path, strategy: str, resumes: int) -> dict:
    from fault_common import ENV, PY, ROOT, cli, config, finish, identical, say, torchrun, weights
    from fault_kill import STEPS, TRAIN, reference

    ref = reference(work, shards, strategy)
    run, trace = work / f"power_{strategy}", work / f"power_{strategy}.strace"
    cfg = config(shards, run, work / f"power_{strategy}.yaml", **TRAIN)
    extra = ("train.strategy=fsdp",) if strategy == "fsdp" else ()
    if strategy == "fsdp":
        code, err = finish(torchrun("train", str(cfg), *extra, prefix=tuple(traced([], trace))), 900)
    else:
        proc = subprocess.run(
            traced([PY, "-m", "mmpretrain.cli", "train", str(cfg)], trace),
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=900,
        )
        code, err = proc.returncode, proc.stderr
    assert code == 0, err[-2000:]
    final = run / "checkpoints" / f"step_{STEPS:08d}"
    store = reference_store(ref / "checkpoints", final / "config.yaml", work / f"store_{strategy}")
    same_bytes = _same_files(final, store / final.name, ignore=VOLATILE)
    content_of = reference_content(store, run / "checkpoints")
    states, disk = [], Disk(work, ROOT, watch=run / "checkpoints")
    for n, index in enumerate(crash_states(trace, disk, run / "checkpoints")):
        states.append(_judge(disk, run, store, work / f"cut_{strategy}_{n}", content_of, index))
    rewritten, phantoms = _rewritten(disk, run / "checkpoints"), disk.phantoms
    want = weights(ref / "checkpoints" / f"step_{STEPS:08d}")
    picks = sorted({round(k * (len(states) - 1) / max(1, resumes - 1)) for k in range(resumes)})
    for k in picks:
        s = states[k]
        cut_cfg = config(shards, Path(s["folder"]), work / f"cut_{strategy}_{k}.yaml", **TRAIN)
        if strategy == "fsdp":
            code, _ = finish(torchrun("train", str(cut_cfg), "train.resume=latest", *extra), 600)
        else:
            code = cli("train", str(cut_cfg), "train.resume=latest").returncode
        final = Path(s["folder"]) / "checkpoints" / f"step_{STEPS:08d}"
        s["resumed_identical"] = code == 0 and identical(weights(final), want)
        say(
            f"power loss ({strategy}) state {k}: accepted step {s['accepted']}, saved {s['saved']}, "
            f"resumed identical={s['resumed_identical']}"
        )
    return {
        "states": states,
        "content_model_valid": same_bytes and not rewritten and not phantoms,
        "rewritten_files": rewritten,
        "model_gaps": phantoms,
        "corrupt_accepted": sum(s["corrupt"] for s in states),
        "progress_lost": sum(s["lost"] for s in states),
        "no_checkpoint_after_save": sum(s["accepted"] is None and s["saved"] is not None for s in states),
        "short_files": sum(s["short_files"] for s in states),
        "resumed": sum("resumed_identical" in s for s in states),
        "resumed_identical": sum(s.get("resumed_identical", False) for s in states),
    }


def _judge(disk: Disk, run: Path, store: Path, out: Path, content_of, index: int) -> dict:
    """Rebuild one crash state at ``out`` (as a run folder) and ask ``find_latest`` which checkpoint it
    would resume from; corrupt: that checkpoint's files differ from the reference's; lost: it is older
    than the newest checkpoint whose save had returned."""
    from mmpretrain.models.layout import find_latest, step_of

    node = disk.durable_node(run / "checkpoints")
    short = rebuild(node, out / "checkpoints", content_of) if node is not None else 0
    latest = find_latest(out)
    accepted = step_of(latest) if latest is not None else None
    corrupt = latest is not None and not _same_files(latest, store / latest.name)
    lost = disk.saved is not None and (accepted or 0) < disk.saved
    return {
        "call": index,
        "folder": str(out),
        "saved": disk.saved,
        "accepted": accepted,
        "corrupt": corrupt,
        "lost": lost,
        "short_files": short,
        "durable": sorted(node.durable) if node is not None else [],
    }


def _same_files(a: Path, b: Path, ignore: frozenset[str] = frozenset()) -> bool:
    """The same files with the same bytes; those in ``ignore`` only present (and their entries left out
    of the two checksums.json, which are compared parsed)."""
    from mmpretrain.models.layout import CHECKSUMS
    from mmpretrain.utils.io import sha256_file

    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())  # noqa: E731
    if files(a) != files(b):
        return False
    if ignore:
        sums = [
            {k: v for k, v in json.loads((x / CHECKSUMS).read_text())["files"].items() if k not in ignore}
            for x in (a, b)
        ]
        if sums[0] != sums[1]:
            return False
        ignore = ignore | {CHECKSUMS}
    return all(sha256_file(a / f) == sha256_file(b / f) for f in files(a) if f.as_posix() not in ignore)


def _rewritten(disk: Disk, checkpoints: Path) -> list[str]:
    """Checkpoint files written again after an fsync, in the replayed trace (the content model would not
    hold for them)."""
    inside = str(checkpoints) + os.sep
    return [n.origin for n in disk.nodes if n.rewritten and n.origin.startswith(inside)]
