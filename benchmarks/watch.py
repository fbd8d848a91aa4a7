"""What a service benchmark watches while it loads the service: normal clients searching, /health probed,
the server's and its decoder's RSS sampled; and the helpers to start ``retrieval serve`` and ask it."""

from __future__ import annotations

import http.client
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "red blue green yellow small large smiling sad happy angry old new fast slow face heart car cat dog "
    "tree house star moon sun fire water phone laptop camera clock music book rocket flag key lock cloud rain "
    "snow storm bird fish flower hand eye person building computer printer envelope bell gift"
).split()


def start(index: str, port: int, extra: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    """``retrieval serve INDEX`` (``index``: ``[NAME=]PATH``) on loopback, once ``/health`` answers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    cmd = [sys.executable, "-m", "retrieval.cli", "serve", index, "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if request(port, "GET", "/health")[0] == 200:
                return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start")


def distinct_queries(seed: int):
    """An endless stream of distinct queries (a counter makes each one unique)."""
    rng, n = random.Random(seed), 0
    while True:
        n += 1
        yield f"a {rng.choice(WORDS)} {rng.choice(WORDS)} {rng.choice(WORDS)} number {seed}-{n}"


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (``pid`` None) or of another one (from /proc)."""
    if pid is None:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_mb(pid: int | str, *keys: str) -> dict[str, float]:
    """Size fields of ``/proc/PID/status`` in MB (``VmRSS``: resident, ``VmHWM``: peak resident), by key;
    ``pid`` "self" for this process; those not there (the process gone) are left out."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in keys:
                out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def rss_mb(pid: int) -> float:
    return status_mb(pid, "VmRSS").get("VmRSS", 0.0)


def children(pid: int) -> list[int]:
    """``pid``'s child processes, started by any of its threads (the decoder is started from the event
    loop's thread, not the main one)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def request(port, method, path, body=b"", headers=None, source="127.0.0.1", timeout=30) -> tuple[int, bytes, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


# ------------------------------------------------------------------ what runs throughout
@dataclass
class Watch:
    """Normal clients, the /health prober and the RSS sampler, appending (time, value) throughout."""

    port: int
    pid: int
    normal: list = field(default_factory=list)  # (t, seconds, status)
    health: list = field(default_factory=list)  # (t, seconds)
    rss: list = field(default_factory=list)  # (t, server MB, decoder MB, {pid: CPU seconds} of server and decoders)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self, clients: int = 8) -> None:
        for i in range(clients):
            threading.Thread(target=self._client, args=(i,), daemon=True).start()
        threading.Thread(target=self._prober, daemon=True).start()
        threading.Thread(target=self._sampler, daemon=True).start()

    def _client(self, seed: int) -> None:
        queries, conn = distinct_queries(seed), None
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                conn = conn or http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=60, source_address=(f"127.0.0.{10 + seed}", 0)
                )  # each normal client its own address, as users are: the server's fairness is per address
                conn.request("GET", f"/search?q={urllib.parse.quote(next(queries))}&k=10")
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                status, conn = -1, None
            self.normal.append((t0, time.perf_counter() - t0, status))

    def _prober(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                status = request(self.port, "GET", "/health", timeout=10)[0]
            except OSError:
                status = -1
            self.health.append((t0, time.perf_counter() - t0 if status == 200 else 10.0))
            time.sleep(0.05)

    def _sampler(self) -> None:
        while not self.stop.is_set():
            decoders = children(self.pid)
            cpu = {}
            for pid in [self.pid, *decoders]:
                try:
                    cpu[pid] = cpu_seconds(pid)
                except (OSError, IndexError):  # gone between the listing and the read
                    pass
            sample = (time.perf_counter(), rss_mb(self.pid), max([rss_mb(p) for p in decoders] or [0.0]), cpu)
            self.rss.append(sample)
            time.sleep(0.1)

    def window(self, t0: float, t1: float) -> dict:
        normal = [s for t, s, code in self.normal if t0 <= t < t1 and code == 200]
        errors = [code for t, _, code in self.normal if t0 <= t < t1 and (code >= 500 and code != 503 or code < 0)]
        rss = [(a, b) for t, a, b, _ in self.rss if t0 <= t < t1]
        cpu = [(t, c) for t, _, _, c in self.rss if t0 <= t < t1]
        return {
            "normal_p50": percentile(normal, 50),
            "normal_p99": percentile(normal, 99),
            "normal_n": len(normal),
            "normal_5xx": len(errors),
            "health_p99": percentile([s for t, s in self.health if t0 <= t < t1], 99),
            "server_cpu": cores(cpu),
            "server_mb": max((a for a, _ in rss), default=0.0),
            "decoder_mb": max((b for _, b in rss), default=0.0),
        }


def cores(samples: list[tuple[float, dict[int, float]]]) -> float:
    """Cores used between the first and the last sample, summed over processes: each process counted
    from its first sample in the window (a decoder recycled mid-window is not a negative figure)."""
    if len(samples) < 2:
        return 0.0
    first: dict[int, float] = {}
    for _, cpu in samples:
        for pid, seconds in cpu.items():
            first.setdefault(pid, seconds)
    last: dict[int, float] = {}
    for _, cpu in samples:
        last.update(cpu)
    used = sum(last[pid] - first[pid] for pid in last)
    return used / (samples[-1][0] - samples[0][0])
