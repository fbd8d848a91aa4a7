#!/usr/bin/env python
"""Load test of the search service: concurrent clients on 127.0.0.1 for a bounded time.

    python benchmarks/serve_load.py INDEX [--clients 8] [--seconds 20]     # starts `retrieval serve INDEX`
    python benchmarks/serve_load.py --url http://127.0.0.1:8000            # a server already running

Each client keeps one HTTP/1.1 connection and sends GET /search?q=...&k=10 with queries drawn
from a fixed list, back to back. Prints requests/s, p50/p90/p99 latency and the error count
(0 expected), and, when it started the server itself, the same queries through the Searcher in
process (no HTTP) as the peer: the ratio is what the HTTP layer costs.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["a red circle", "a dog face", "a smiling face", "a car", "a blue square", "a heart", "weather storm",
           "a printer", "a laptop computer", "a cat", "a green triangle", "a rocket", "a musical note", "fire",
           "a tree", "a house", "an envelope", "a clock", "a camera", "a star"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: str, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", index, "--port", str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start")


def client(url: str, seconds: float, seed: int, out: list, errors: list) -> None:
    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    rng = random.Random(seed)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        q = urllib.parse.quote(rng.choice(QUERIES))
        t0 = time.perf_counter()
        try:
            conn.request("GET", f"/search?q={q}&k=10")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200 or not json.loads(body)["results"]:
                errors.append(resp.status)
                continue
        except (OSError, http.client.HTTPException, ValueError) as exc:
            errors.append(repr(exc))
            conn.close()
            conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
            continue
        out.append(time.perf_counter() - t0)


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def in_process(index: str, seconds: float) -> float:
    """Queries/s of Searcher.search in this process, one query at a time (the peer without HTTP)."""
    sys.path.insert(0, str(ROOT))
    from retrieval.search import Searcher

    s = Searcher.open(index)
    n, end, rng = 0, time.perf_counter() + seconds, random.Random(0)
    while time.perf_counter() < end:
        s.search(rng.choice(QUERIES), k=10)
        n += 1
    return n / seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", nargs="?", help="index folder to serve (omit with --url)")
    p.add_argument("--url", help="a running server instead of starting one")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--server-threads", type=int, default=2, help="OMP threads of the server it starts")
    args = p.parse_args()
    if not (args.url or args.index):
        p.error("give INDEX or --url")
    proc = None
    url = args.url
    if not url:
        port = free_port()
        proc = start_server(args.index, port, args.server_threads)
        url = f"http://127.0.0.1:{port}"
    try:
        latencies: list[float] = []
        errors: list = []
        threads = [threading.Thread(target=client, args=(url, args.seconds, i, latencies, errors))
                   for i in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    rps = len(latencies) / wall
    ms = {p_: 1000 * percentile(latencies, p_) for p_ in (50, 90, 99)}
    print(f"{args.clients} clients x {args.seconds:.0f} s on {url}: {len(latencies)} requests, {rps:.1f} requests/s, "
          f"p50 {ms[50]:.1f} ms, p90 {ms[90]:.1f} ms, p99 {ms[99]:.1f} ms, errors {len(errors)}")
    if errors:
        print(f"first errors: {errors[:5]}")
    if args.index and not args.url:
        peer = in_process(args.index, min(args.seconds, 10))
        print(f"in-process Searcher.search (no HTTP, 1 query at a time): {peer:.1f} queries/s; "
              f"service / in-process = {rps / peer:.2f}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
