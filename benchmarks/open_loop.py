"""Open-loop load for ``benchmarks/serve_load.py``: requests arrive at fixed times (i / rate), whatever
the server's answers, and each latency counts from the request's *scheduled* time, so a slow answer
delays the count of every request queued behind it (no coordinated omission: a closed-loop client that
waits for its answer before sending the next one stops measuring exactly when the server is slow).

Each of ``users`` connections comes from its own loopback address (127.0.x.y), as users do: the
service's fairness is per address. A request waits for a free connection; that wait counts.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections import Counter
from pathlib import Path

from watch import distinct_queries, percentile


def user_address(i: int) -> str:
    return f"127.0.{1 + i // 250}.{2 + i % 250}"


async def request(
    reader, writer, method: str, path: str, body: bytes = b"", headers: str = ""
) -> tuple[int, bytes, bool]:
    """One HTTP/1.1 request on a kept-alive connection: (status, body, whether the server closes the
    connection after it: a refusal (503, 429) says ``Connection: close``, and the client must reconnect)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode()
    writer.write(head + body)
    status_line = await reader.readline()
    length, close = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        elif name.strip().lower() == b"connection" and value.strip().lower() == b"close":
            close = True
    data = await reader.readexactly(length) if length else b""
    return int(status_line.split()[1]), data, close


async def _connect(port: int, i: int):
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(user_address(i), 0))


async def _run(port: int, rate: float, seconds: float, users: int, seed: int) -> dict:
    pool: asyncio.Queue = asyncio.Queue()
    for i in range(users):
        pool.put_nowait((i, *(await _connect(port, i))))
    latencies, codes, queries = [], Counter(), distinct_queries(seed)

    async def one(scheduled: float, query: str) -> None:
        i, reader, writer = await pool.get()
        try:
            status, _, close = await request(reader, writer, "GET", f"/search?q={urllib.parse.quote(query)}&k=10")
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            status, close = "error", True
        if close:
            writer.close()
            reader, writer = await _connect(port, i)
        codes[status] += 1
        if status == 200:
            latencies.append(time.perf_counter() - scheduled)
        pool.put_nowait((i, reader, writer))

    tasks, start = [], time.perf_counter() + 0.2
    for n in range(int(rate * seconds)):
        scheduled = start + n / rate
        if (delay := scheduled - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled, next(queries))))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    while not pool.empty():
        pool.get_nowait()[2].close()
    ms = lambda p: 1000 * percentile(latencies, p)  # noqa: E731
    return {
        "offered_rps": rate,
        "achieved_rps": len(latencies) / wall,
        "p50_ms": ms(50),
        "p99_ms": ms(99),
        "p999_ms": ms(99.9),
        "codes": {str(k): v for k, v in codes.items()},
    }


def open_loop(port: int, rate: float, seconds: float, users: int = 64, seed: int = 0) -> dict:
    """``rate`` requests a second for ``seconds`` (distinct text queries, k = 10) over ``users``
    connections: achieved rate, p50/p99/p99.9 from the scheduled times, status counts."""
    return asyncio.run(_run(port, rate, seconds, users, seed))


def plot(rows: list[dict], capacity: float, out: Path, title: str) -> None:
    """Latency (p50, p99, p99.9) against achieved throughput, one point per offered rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [r["achieved_rps"] for r in rows]
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
        ax.plot(x, [r[key] for r in rows], marker="o", label=label)
    ax.axvline(capacity, color="grey", linestyle=":", label=f"closed-loop capacity {capacity:.0f} req/s")
    ax.set_xlabel("answered requests/s (open loop, fixed arrival rate)")
    ax.set_ylabel("latency from scheduled send (ms)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
