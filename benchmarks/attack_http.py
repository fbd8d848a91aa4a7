"""benchmarks/attack.py's HTTP pieces: the attacker's request, the payloads it builds (a resize-bomb PNG,
small PNGs, a multipart form) and the two origin servers the SSRF attack needs (an allowed image host that
redirects where it must not lead, and a private service that counts the hits it should never get)."""

from __future__ import annotations

import http.client
import http.server
import io
import threading

from PIL import Image
from watch import request

ATTACKER = "127.0.0.2"


def hit(port, method, path, body=b"", headers=None, source=ATTACKER) -> tuple[int | str, bytes, dict]:
    """An attacker's request: (status, body, headers), status "dropped" when the server closed the
    connection unanswered (a peer opening connections too fast)."""
    try:
        return request(port, method, path, body, headers, source)
    except (OSError, http.client.HTTPException):
        return "dropped", b"", {}


def bomb_png(width: int = 2_000_000, height: int = 20) -> bytes:
    """The issue's resize bomb: a 1-bit PNG of 2,000,000 x 20 (a few KB; 40 MP, just under the cap)."""
    buf = io.BytesIO()
    Image.new("1", (width, height), 1).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def small_png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (seed % 256, 80, 160)).save(buf, format="PNG")
    return buf.getvalue()


def multipart(fields: dict[str, str], image: bytes) -> tuple[bytes, dict]:
    b = "----mmpretrain-attack"
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    head = f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png'
    parts.append(f"{head}\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{b}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={b}"}


class Origin(http.server.BaseHTTPRequestHandler):
    """The allowed image host (redirects to where it must not lead) and a private service that counts hits."""

    private_hits: list = []
    png = b""
    private_port = 0

    def do_GET(self):  # noqa: N802
        if self.server.server_port == self.private_port:
            self.private_hits.append(self.path)
        to = {
            "/to-private": f"http://127.0.0.1:{self.private_port}/secret",
            "/to-metadata": "http://169.254.169.254/latest/meta-data/",
            "/to-ftp": "ftp://127.0.0.1/etc/passwd",
        }.get(self.path)
        body = self.png if self.path == "/img.png" else b"private data"
        self.send_response(302 if to else 200)
        if to:
            self.send_header("Location", to)
        self.send_header("Content-Length", str(0 if to else len(body)))
        self.end_headers()
        self.wfile.write(b"" if to else body)

    def log_message(self, *args):
        pass


def origin_servers() -> tuple[int, int]:
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Origin) for _ in range(2)]
    Origin.private_port, Origin.png = servers[1].server_port, small_png(7)
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    return servers[0].server_port, servers[1].server_port
