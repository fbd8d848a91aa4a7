#!/usr/bin/env python
"""Load test of the search service on 127.0.0.1: concurrent clients for a bounded time, every query
distinct (no cache can help), beside two in-process peers measured in the same run.

    python benchmarks/serve_load.py INDEX [--clients 1 8 32 128] [--seconds 15] [--no-hostile]

1. Peers, in this process with the server idle: ``Searcher.search`` one query at a time (queries/s), and
   its best batched rate (64 distinct queries a call: the ceiling the service can approach).
2. ``retrieval serve INDEX`` in a subprocess; for each client count, clients send
   ``GET /search?q=<distinct>&k=10`` back to back on kept-alive connections while a prober reads
   ``/health`` every 50 ms: requests/s, p50/p99 of the answered ones, 503s (load shed) with their p99,
   other errors, /health p99 and max.
3. Hostile load (unless --no-hostile): 8 normal clients search while 2 clients loop ``/classify`` with
   200 labels and a 16-megapixel PNG and 1 client keeps sending a 64 MB JSON body; the normal clients'
   p99 against their unloaded p99, and /health's worst latency.

Goals (issue 12, 2 cores): at 32 clients >= 8x the one-at-a-time rate and >= 0.8x the batched ceiling,
p99 <= 2x p50, 0 errors; at 128, overload answered by fast 503s with /health p99 <= 100 ms; under
hostile load the normal p99 within 2x its unloaded value and /health never over 100 ms.
Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from watch import ROOT, WORDS, cpu_seconds, distinct_queries, free_port, percentile, start


def start_server(index: str, port: int, extra: list[str]) -> subprocess.Popen:
    return start(index, port, extra)


@dataclass
class Tally:
    ok: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    errors: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: int, seconds: float, detail=None) -> None:
        with self.lock:
            if status == 200:
                self.ok.append(seconds)
            elif status == 503:
                self.busy.append(seconds)
            else:
                self.errors.append(detail or status)


async def _request(reader, writer, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request on a kept-alive connection: (status, body)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    writer.write(head + body)
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    data = await reader.readexactly(length) if length else b""
    return int(status_line.split()[1]), data


async def search_client(port: int, until: float, seed: int, tally: Tally) -> None:
    """Sends distinct queries back to back on one connection (asyncio: a light client, since it shares
    the machine's two cores with the server)."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    queries = distinct_queries(seed)
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        try:
            status, body = await _request(reader, writer, "GET", f"/search?q={urllib.parse.quote(next(queries))}&k=10")
            ok = status != 200 or b'"rank":0' in body  # a first hit
            tally.add(status if ok else -1, time.perf_counter() - t0, None if ok else "empty results")
            if status == 503:  # a polite client waits a little before retrying
                await asyncio.sleep(0.05)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
            tally.add(-1, time.perf_counter() - t0, repr(exc))
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()


def _clients(port: int, until: float, clients: int, tally: Tally) -> None:
    import asyncio

    async def main():
        await asyncio.gather(*(search_client(port, until, 1000 * clients + i, tally) for i in range(clients)))

    asyncio.run(main())


def health_prober(port: int, until: float, out: list[float]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        try:
            conn.request("GET", "/health")
            conn.getresponse().read()
            out.append(time.perf_counter() - t0)
        except (OSError, http.client.HTTPException):
            out.append(time.perf_counter() - t0)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        time.sleep(0.05)


def run_load(
    port: int, clients: int, seconds: float, extra_threads: list[threading.Thread] = (), server_pid: int | None = None
) -> dict:
    tally, health = Tally(), []
    cpu0 = (cpu_seconds(), cpu_seconds(server_pid) if server_pid else 0.0)
    until = time.perf_counter() + seconds
    threads = [
        threading.Thread(target=_clients, args=(port, until, clients, tally), daemon=True),
        threading.Thread(target=health_prober, args=(port, until, health), daemon=True),
    ]
    for t in [*threads, *extra_threads]:
        t.start()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    client_cpu = (cpu_seconds() - cpu0[0]) / wall
    server_cpu = (cpu_seconds(server_pid) - cpu0[1]) / wall if server_pid else float("nan")
    ms = lambda xs, p: 1000 * percentile(xs, p)  # noqa: E731
    return {
        "clients": clients,
        "client_cores": client_cpu,
        "server_cores": server_cpu,
        "requests": len(tally.ok),
        "rps": len(tally.ok) / wall,
        "p50_ms": ms(tally.ok, 50),
        "p99_ms": ms(tally.ok, 99),
        "busy_503": len(tally.busy),
        "busy_p99_ms": ms(tally.busy, 99),
        "errors": len(tally.errors),
        "first_errors": [str(e)[:120] for e in tally.errors[:3]],
        "health_p99_ms": ms(health, 99),
        "health_max_ms": 1000 * max(health, default=float("nan")),
    }


# ------------------------------------------------------------------ peers
def peers(index: str, seconds: float) -> dict:
    sys.path.insert(0, str(ROOT))
    from retrieval.search import Searcher

    s = Searcher.open(index)
    s.search("warm up", k=10)
    queries, n = distinct_queries(7), 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        s.search(next(queries), k=10)
        n += 1
    one = n / seconds
    best = 0.0
    for size in (16, 32, 64):
        end, n = time.perf_counter() + seconds / 3, 0
        t0 = time.perf_counter()
        while time.perf_counter() < end:
            s.search([next(queries) for _ in range(size)], k=10)
            n += size
        best = max(best, n / (time.perf_counter() - t0))
    return {"one_at_a_time_qps": one, "batched_ceiling_qps": best}


# ------------------------------------------------------------------ hostile load
def big_png() -> bytes:
    """A 16-megapixel PNG (4000 x 4000) that compresses to a few MB: smooth gradients plus a little noise."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:4000, 0:4000]
    rgb = np.stack([(x // 16) % 256, (y // 16) % 256, ((x + y) // 32) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def classify_client(port: int, until: float, png: bytes, out: list) -> None:
    labels = "\n".join(f"{a} {b}" for a, b in zip(WORDS * 5, reversed(WORDS * 5)))[:4000].split("\n")[:200]
    boundary = "----mmpretrainbench"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="labels"\r\n\r\n{chr(10).join(labels)}\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + png
        + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    body = b"".join(parts)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/classify", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
            resp = conn.getresponse()
            resp.read()
            out.append((resp.status, time.perf_counter() - t0))
        except (OSError, http.client.HTTPException) as exc:
            out.append((repr(exc), time.perf_counter() - t0))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)


def huge_body_client(port: int, until: float, out: list) -> None:
    """Keeps POSTing a 64 MB JSON body to /knn-service; the server should refuse it from its headers."""
    chunk = b'{"text": "' + b"x" * (1 << 20)
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(
                    b"POST /knn-service HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 67108864\r\n\r\n"
                )
                for _ in range(64):
                    sock.sendall(chunk)
                    if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                        break
        except BlockingIOError:
            pass
        except OSError:
            pass  # the server closed the connection after its 413: the intended outcome
        out.append(time.perf_counter() - t0)
        time.sleep(0.05)


def hostile(port: int, seconds: float, clients: int = 8, parts: tuple[str, ...] = ("classify", "huge")) -> dict:
    png = big_png()
    baseline = run_load(port, clients, seconds)
    until = time.perf_counter() + seconds
    classify, huge, extra = [], [], []
    if "classify" in parts:
        extra += [
            threading.Thread(target=classify_client, args=(port, until, png, classify), daemon=True) for _ in range(2)
        ]
    if "huge" in parts:
        extra.append(threading.Thread(target=huge_body_client, args=(port, until, huge), daemon=True))
    loaded = run_load(port, clients, seconds, extra)
    for t in extra:
        t.join(timeout=120)
    statuses = sorted({str(s) for s, _ in classify})
    return {
        "png_bytes": len(png),
        "unloaded": baseline,
        "loaded": loaded,
        "classify_requests": len(classify),
        "classify_statuses": statuses,
        "classify_p50_ms": 1000 * percentile([t for _, t in classify], 50),
        "huge_bodies_sent": len(huge),
        "huge_body_p99_ms": 1000 * percentile(huge, 99),
    }


def report(result: dict) -> None:
    p = result["peers"]
    print(
        f"\npeers (in process, same run): Searcher one query at a time {p['one_at_a_time_qps']:.1f} q/s; "
        f"batched ceiling {p['batched_ceiling_qps']:.1f} q/s"
    )
    print(
        f"{'clients':>7} {'req/s':>7} {'x 1-at-a-time':>13} {'x ceiling':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'p99/p50':>7} {'503s':>6} {'503 p99 ms':>10} {'errors':>6} {'/health p99':>11} {'max':>7} "
        f"{'cores: server':>13} {'client':>6}"
    )
    for r in result["load"]:
        print(
            f"{r['clients']:7d} {r['rps']:7.1f} {r['rps'] / p['one_at_a_time_qps']:13.1f} "
            f"{r['rps'] / p['batched_ceiling_qps']:9.2f} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} "
            f"{r['p99_ms'] / r['p50_ms']:7.2f} {r['busy_503']:6d} {r['busy_p99_ms']:10.1f} {r['errors']:6d} "
            f"{r['health_p99_ms']:11.1f} {r['health_max_ms']:7.1f} {r['server_cores']:13.2f} {r['client_cores']:6.2f}"
        )
        if r["first_errors"]:
            print(f"        first errors: {r['first_errors']}")
    if "hostile" in result:
        h = result["hostile"]
        u, lo = h["unloaded"], h["loaded"]
        print(
            f"\nhostile load ({h['png_bytes'] / 2**20:.1f} MB 16-megapixel PNG, 200 labels; a 64 MB JSON body looped):"
        )
        print(f"  8 normal clients unloaded: p99 {u['p99_ms']:.1f} ms, {u['rps']:.1f} req/s")
        print(
            f"  8 normal clients loaded:   p99 {lo['p99_ms']:.1f} ms ({lo['p99_ms'] / u['p99_ms']:.2f}x), "
            f"{lo['rps']:.1f} req/s, errors {lo['errors']}, 503s {lo['busy_503']}"
        )
        print(f"  /health under load: p99 {lo['health_p99_ms']:.1f} ms, max {lo['health_max_ms']:.1f} ms")
        print(
            f"  /classify: {h['classify_requests']} answered ({', '.join(h['classify_statuses'])}), "
            f"p50 {h['classify_p50_ms']:.0f} ms; 64 MB bodies: {h['huge_bodies_sent']} refused, "
            f"p99 {h['huge_body_p99_ms']:.1f} ms to refusal"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", help="index folder to serve (e.g. runs/demo/index after `make demo`)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--no-hostile", action="store_true")
    p.add_argument("--hostile-parts", nargs="+", default=["classify", "huge"], choices=["classify", "huge"])
    p.add_argument("--server-args", default="", help="extra `retrieval serve` options, e.g. '--max-queue 32'")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    result = {"peers": peers(args.index, min(args.seconds, 10))}
    port = free_port()
    proc = start_server(args.index, port, args.server_args.split())
    try:
        run_load(port, 4, 3)  # warm-up
        result["load"] = [run_load(port, n, args.seconds, server_pid=proc.pid) for n in args.clients]
        if not args.no_hostile:
            result["hostile"] = hostile(port, args.seconds, parts=tuple(args.hostile_parts))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
