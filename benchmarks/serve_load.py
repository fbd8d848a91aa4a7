#!/usr/bin/env python
"""Load test of the search service on 127.0.0.1: concurrent clients for a bounded time, every query
distinct (no cache can help), each client from its own loopback address (the service's fairness is per
address, as it is per user), beside two in-process peers measured in the same run.

    python benchmarks/serve_load.py INDEX [--clients 1 8 32 128] [--seconds 15] [--open-loop 0.3 0.5 0.7 0.9]
        [--no-hostile] [--log benchmarks/results/serve_load_DATE.log] [--plot latency.png]

0. Cold start: seconds from the server process's start to its first 200 on /search.
1. Peers, in this process with the server idle: ``Searcher.search`` one query at a time (queries/s), and
   its best batched rate (up to 64 distinct queries a call: the ceiling the service can approach).
2. Closed loop: for each client count, clients send ``GET /search?q=<distinct>&k=10`` back to back on
   kept-alive connections while a prober reads ``/health`` every 50 ms: requests/s, p50/p99 of the
   answered ones, 503s, other errors, /health p99 and max; then a row of image queries (POST /search,
   one distinct 64 px PNG each).
3. Open loop (``benchmarks/open_loop.py``): requests at a fixed arrival rate, a fraction of the best
   closed-loop rate, latency counted from each request's scheduled send (no coordinated omission):
   p50/p99/p99.9 per rate, and a latency-vs-throughput PNG (--plot). Then the server's and the
   decoder's RSS.
4. Hostile load (unless --no-hostile): 8 normal clients search while 2 clients loop ``/classify`` with
   200 labels new each time and a 16-megapixel PNG, and 1 client keeps sending a 64 MB JSON body; the
   normal clients' p99 against their unloaded p99, /health's worst latency, and the status of every
   hostile request, read.

Goals (issues 12 and 28, 2 cores): at 32 clients >= 0.8x the batched ceiling, 0 errors; open loop at 70%
of capacity p99 <= 2x p50; at 128, overload answered by fast 503s with /health p99 <= 100 ms; under
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from logs import header
from open_loop import open_loop, plot, request, user_address
from watch import ROOT, WORDS, cpu_seconds, distinct_queries, free_port, percentile, start, status_mb


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


async def search_client(port: int, until: float, seed: int, tally: Tally, user: int = 0, images: bool = False) -> None:
    """Sends distinct queries back to back on one connection from its own loopback address (a user; the
    service's fairness is per address), text (GET /search) or one distinct small image each (POST
    /search); asyncio: a light client, since it shares the machine's two cores with the server."""
    import asyncio

    connect = lambda: asyncio.open_connection("127.0.0.1", port, local_addr=(user_address(user), 0))  # noqa: E731
    reader, writer = await connect()
    queries = distinct_queries(seed)
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        try:
            if images:
                body = json.dumps({"images": [small_png_b64(seed, t0)], "k": 10}).encode()
                status, body, close = await request(
                    reader, writer, "POST", "/search", body, "Content-Type: application/json\r\n"
                )
            else:
                query = urllib.parse.quote(next(queries))
                status, body, close = await request(reader, writer, "GET", f"/search?q={query}&k=10")
            ok = status != 200 or b'"rank":0' in body  # a first hit
            tally.add(status if ok else -1, time.perf_counter() - t0, None if ok else "empty results")
            if status == 503:  # a polite client waits a little before retrying
                await asyncio.sleep(0.05)
            if close:  # a refusal closes the connection: open a new one, as an HTTP client does
                writer.close()
                reader, writer = await connect()
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
            tally.add(-1, time.perf_counter() - t0, repr(exc))
            writer.close()
            reader, writer = await connect()
    writer.close()


def small_png_b64(seed: int, salt: float) -> str:
    """A distinct 64 x 64 noise PNG (no cache, no duplicate), base64."""
    import base64

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([seed, int(salt * 1e6)])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _clients(port: int, until: float, clients: int, tally: Tally, images: bool = False) -> None:
    import asyncio

    async def main():
        await asyncio.gather(
            *(search_client(port, until, 1000 * clients + i, tally, i, images) for i in range(clients))
        )

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
    port: int,
    clients: int,
    seconds: float,
    extra_threads: list[threading.Thread] = (),
    server_pid: int | None = None,
    images: bool = False,
) -> dict:
    tally, health = Tally(), []
    cpu0 = (cpu_seconds(), cpu_seconds(server_pid) if server_pid else 0.0)
    until = time.perf_counter() + seconds
    threads = [
        threading.Thread(target=_clients, args=(port, until, clients, tally, images), daemon=True),
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
        "kind": "image" if images else "text",
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
def peers(index: str, seconds: float, onnx: str | None = None) -> dict:
    """The in-process rates, with the backend the server uses (``onnx``: an export run by onnxruntime)."""
    sys.path.insert(0, str(ROOT))
    from retrieval.jobs.search import Searcher

    s = Searcher.open(index, onnx, backend="onnxruntime") if onnx else Searcher.open(index)
    s.search("warm up", k=10)
    queries, n = distinct_queries(7), 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        s.search(next(queries), k=10)
        n += 1
    one = n / seconds
    by_size = {}
    for size in (16, 32, 64):
        end, n = time.perf_counter() + seconds / 3, 0
        t0 = time.perf_counter()
        while time.perf_counter() < end:
            s.search([next(queries) for _ in range(size)], k=10)
            n += size
        by_size[size] = round(n / (time.perf_counter() - t0), 1)
    return {"one_at_a_time_qps": one, "batched_ceiling_qps": max(by_size.values()), "batched_qps": by_size}


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


def classify_client(port: int, until: float, png: bytes, out: list, who: int = 0) -> None:
    """Loops /classify with the big PNG and 200 labels new to the server each time (no label cache helps)."""
    boundary, n = "----mmpretrainbench", 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120, source_address=(user_address(200 + who), 0))
    while time.perf_counter() < until:
        n += 1
        labels = "\n".join(f"{WORDS[(j + n) % len(WORDS)]} thing {who}-{n}-{j}" for j in range(200))
        body = b"".join(
            [
                f'--{boundary}\r\nContent-Disposition: form-data; name="labels"\r\n\r\n{labels}\r\n'.encode(),
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
                f"Content-Type: image/png\r\n\r\n".encode()
                + png
                + b"\r\n",
                f"--{boundary}--\r\n".encode(),
            ]
        )
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/classify", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
            resp = conn.getresponse()
            resp.read()
            out.append((resp.status, time.perf_counter() - t0))
        except (OSError, http.client.HTTPException) as exc:
            out.append((type(exc).__name__, time.perf_counter() - t0))
            conn.close()
            conn = http.client.HTTPConnection(
                "127.0.0.1", port, timeout=120, source_address=(user_address(200 + who), 0)
            )


def huge_body_client(port: int, until: float, out: list) -> None:
    """Keeps POSTing a 64 MB JSON body to /knn-service and reads the status the server answers (413
    from its headers is the goal) and how long it took."""
    chunk = b'{"text": "' + b"x" * (1 << 20)
    while time.perf_counter() < until:
        t0, status = time.perf_counter(), "no answer"
        try:
            with socket.create_connection(
                ("127.0.0.1", port), timeout=30, source_address=(user_address(240), 0)
            ) as sock:
                sock.sendall(
                    b"POST /knn-service HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 67108864\r\n\r\n"
                )
                for _ in range(64):
                    if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                        break
                    sock.sendall(chunk)
                head = sock.recv(64)
                status = int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else "no answer"
        except BlockingIOError:
            try:
                head = sock.recv(64)
                status = int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else "no answer"
            except OSError:
                status = "closed"
        except OSError:
            status = "closed"  # reset after the answer was sent but before it was read
        out.append((status, time.perf_counter() - t0))
        time.sleep(0.05)


def hostile(port: int, seconds: float, clients: int = 8, parts: tuple[str, ...] = ("classify", "huge")) -> dict:
    png = big_png()
    baseline = run_load(port, clients, seconds)
    until = time.perf_counter() + seconds
    classify, huge, extra = [], [], []
    if "classify" in parts:
        extra += [
            threading.Thread(target=classify_client, args=(port, until, png, classify, w), daemon=True)
            for w in range(2)
        ]
    if "huge" in parts:
        extra.append(threading.Thread(target=huge_body_client, args=(port, until, huge), daemon=True))
    loaded = run_load(port, clients, seconds, extra)
    for t in extra:
        t.join(timeout=120)
    statuses = dict(Counter(str(code) for code, _ in classify))
    return {
        "png_bytes": len(png),
        "unloaded": baseline,
        "loaded": loaded,
        "classify_requests": len(classify),
        "classify_statuses": statuses,
        "classify_p50_ms": 1000 * percentile([t for _, t in classify], 50),
        "huge_bodies_sent": len(huge),
        "huge_statuses": dict(Counter(str(code) for code, _ in huge)),
        "huge_body_p99_ms": 1000 * percentile([t for _, t in huge], 99),
    }


def rss_mb(pid: int) -> dict:
    """Resident and peak resident MB of the server process and of all its descendants (the decoder)."""

    def status(p: int) -> dict:
        return status_mb(p, "VmRSS", "VmHWM")

    def descendants(p: int) -> list[int]:
        kids = [int(c) for t in Path(f"/proc/{p}/task").iterdir() for c in (t / "children").read_text().split()]
        return kids + [g for k in kids for g in descendants(k)]

    main, others = status(pid), [status(k) for k in descendants(pid)]
    return {
        "server_rss": main.get("VmRSS", 0.0),
        "server_peak": main.get("VmHWM", 0.0),
        "children_rss": sum(o.get("VmRSS", 0.0) for o in others),
        "children_peak": sum(o.get("VmHWM", 0.0) for o in others),
    }


def cold_start(index: str, port: int, extra: list[str]) -> tuple[subprocess.Popen, float]:
    """Start the server; seconds from the process's start to its first 200 on /search."""
    t0 = time.perf_counter()
    proc = start_server(index, port, extra)
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/search?q=first+query&k=10")
        if conn.getresponse().status == 200:
            return proc, time.perf_counter() - t0
        time.sleep(0.05)


def report(result: dict) -> list[str]:
    p, out = result["peers"], []
    out.append(
        f"index: {result['index']} ({result['ntotal']:,} vectors, {result['index_type']}); cold start to the first "
        f"200 on /search: {result['cold_start_s']:.1f} s; query encoder: {result.get('backend', 'the index')}"
    )
    out.append(
        f"peers (in process, same run): Searcher one query at a time {p['one_at_a_time_qps']:.1f} q/s; "
        f"batched ceiling {p['batched_ceiling_qps']:.1f} q/s (the best of batches of "
        + ", ".join(f"{size}: {qps:.1f}" for size, qps in p.get("batched_qps", {}).items())
        + ")"
    )
    out.append(
        f"{'clients':>7} {'kind':>5} {'req/s':>7} {'x 1-at-a-time':>13} {'x ceiling':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'p99/p50':>7} {'503s':>6} {'errors':>6} {'/health p99':>11} {'max':>7} {'cores: server':>13} {'client':>6}"
    )
    for r in result["load"]:
        out.append(
            f"{r['clients']:7d} {r['kind']:>5} {r['rps']:7.1f} {r['rps'] / p['one_at_a_time_qps']:13.1f} "
            f"{r['rps'] / p['batched_ceiling_qps']:9.2f} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} "
            f"{r['p99_ms'] / r['p50_ms']:7.2f} {r['busy_503']:6d} {r['errors']:6d} "
            f"{r['health_p99_ms']:11.1f} {r['health_max_ms']:7.1f} {r['server_cores']:13.2f} {r['client_cores']:6.2f}"
        )
        if r["first_errors"]:
            out.append(f"        first errors: {r['first_errors']}")
    out += _open_loop_lines(result)
    m = result["rss"]
    out.append(
        f"RSS after the load: server {m['server_rss']:.0f} MB (peak {m['server_peak']:.0f}), its child processes "
        f"(the decoder) {m['children_rss']:.0f} MB (peak {m['children_peak']:.0f})"
    )
    if "hostile" in result:
        out += _hostile_lines(result["hostile"])
    return out


def _open_loop_lines(result: dict) -> list[str]:
    if "open_loop" not in result:
        return []
    cap = result["capacity_rps"]
    out = [
        f"open loop (fixed arrival rate, {result['open_loop_users']} users; latency from the scheduled send; "
        f"capacity = the best closed-loop text req/s, {cap:.1f}):",
        f"  {'offered':>8} {'% cap':>6} {'answered/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} "
        f"{'p99/p50':>7}  codes",
    ]
    for r in result["open_loop"]:
        out.append(
            f"  {r['offered_rps']:8.1f} {100 * r['offered_rps'] / cap:5.0f}% {r['achieved_rps']:10.1f} "
            f"{r['p50_ms']:7.1f} {r['p99_ms']:7.1f} {r['p999_ms']:8.1f} {r['p99_ms'] / r['p50_ms']:7.2f}  {r['codes']}"
        )
    return out


def _hostile_lines(h: dict) -> list[str]:
    u, lo = h["unloaded"], h["loaded"]
    return [
        f"hostile load ({h['png_bytes'] / 2**20:.1f} MB 16-megapixel PNG, 200 new labels each; "
        "a 64 MB JSON body looped):",
        f"  8 normal clients unloaded: p99 {u['p99_ms']:.1f} ms, {u['rps']:.1f} req/s",
        f"  8 normal clients loaded:   p99 {lo['p99_ms']:.1f} ms ({lo['p99_ms'] / u['p99_ms']:.2f}x), "
        f"{lo['rps']:.1f} req/s, errors {lo['errors']}, 503s {lo['busy_503']}",
        f"  /health under load: p99 {lo['health_p99_ms']:.1f} ms, max {lo['health_max_ms']:.1f} ms",
        f"  /classify: {h['classify_requests']} sent, statuses {h['classify_statuses']}, "
        f"p50 {h['classify_p50_ms']:.0f} ms",
        f"  64 MB bodies: {h['huge_bodies_sent']} sent, statuses {h['huge_statuses']}, p99 {h['huge_body_p99_ms']:.1f} "
        "ms to the answer",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", help="index folder to serve (e.g. runs/demo/index after `make demo`)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--image-clients", type=int, default=8, help="a closed-loop row of image queries (0: none)")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument(
        "--open-loop",
        type=float,
        nargs="*",
        default=[0.3, 0.5, 0.7, 0.9],
        help="offered rates as fractions of the closed-loop capacity (none: skip)",
    )
    p.add_argument("--users", type=int, default=64, help="open-loop connections, each from its own address")
    p.add_argument("--no-hostile", action="store_true")
    p.add_argument("--hostile-parts", nargs="+", default=["classify", "huge"], choices=["classify", "huge"])
    p.add_argument("--server-args", default="", help="extra `retrieval serve` options, e.g. '--max-queue 32'")
    p.add_argument(
        "--onnx",
        metavar="DIR",
        help="encode queries with this ONNX export (`mmpretrain export --format onnx`), in the server and its "
        "in-process peer alike",
    )
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--log", help="write the report here (its first line: the command and commit)")
    p.add_argument("--plot", help="latency vs throughput PNG of the open-loop rows")
    args = p.parse_args()
    first = header()
    print(first, flush=True)
    info = json.loads((Path(args.index) / "index.json").read_text())
    result = {"index": args.index, "ntotal": info.get("recall_ntotal", 0), "index_type": info["spec"]["factory"]}
    result["peers"] = peers(args.index, min(args.seconds, 10), args.onnx)
    result["backend"] = f"onnxruntime ({args.onnx})" if args.onnx else "the index's"
    port = free_port()
    server_args = args.server_args.split() + (["--onnx", args.onnx] if args.onnx else [])
    proc, result["cold_start_s"] = cold_start(args.index, port, server_args)
    try:
        run_load(port, 4, 3)  # warm-up
        result["load"] = [run_load(port, n, args.seconds, server_pid=proc.pid) for n in args.clients]
        if args.image_clients:
            run_load(port, 1, 3, images=True)  # warm-up: the decoder process's first image
            result["load"].append(run_load(port, args.image_clients, args.seconds, server_pid=proc.pid, images=True))
        result["capacity_rps"] = max(r["rps"] for r in result["load"] if r["kind"] == "text")
        if args.open_loop:
            result["open_loop_users"] = args.users
            result["open_loop"] = [
                open_loop(port, f * result["capacity_rps"], args.seconds, args.users, seed=k)
                for k, f in enumerate(args.open_loop)
            ]
        result["rss"] = rss_mb(proc.pid)
        if not args.no_hostile:
            result["hostile"] = hostile(port, args.seconds, parts=tuple(args.hostile_parts))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = report(result)
    print("\n".join(lines))
    if args.log:
        Path(args.log).write_text("\n".join([first, *lines]) + "\n")
    if args.plot and result.get("open_loop"):
        plot(result["open_loop"], result["capacity_rps"], Path(args.plot), f"{args.index} ({result['ntotal']:,})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
