"""The sink's HTTP side: `/metrics` (Prometheus) and `/healthz`; with `web:`, the fleet page too."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge.sink.service import Sink


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    sink: Sink
    page: bool


class _Routes(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        sink = self.server.sink
        if path == "/metrics":
            self._send(200, sink.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/healthz":
            ok = sink._connected.is_set()
            body = json.dumps({"status": "ok" if ok else "failing", "mqtt_connected": ok}).encode()
            self._send(200 if ok else 503, body, "application/json")
        elif self.server.page and path in _PAGE_ROUTES:
            _PAGE_ROUTES[path](self, sink)
        else:
            self._send(404, b'{"error":"not found"}', "application/json")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


def _page(handler: _Routes, sink: Sink) -> None:
    from importlib import resources

    body = resources.files("edge.sink").joinpath("fleet.html").read_bytes()
    handler._send(200, body, "text/html; charset=utf-8")


def _fleet(handler: _Routes, sink: Sink) -> None:
    from edge.sink.fleet import snapshot
    from edge.sink.storage import StorageError

    try:
        body = json.dumps(snapshot(sink.storage), default=str).encode()
    except StorageError as exc:
        handler._send(503, json.dumps({"error": str(exc)}).encode(), "application/json")
        return
    handler._send(200, body, "application/json")


def _snapshot(handler: _Routes, sink: Sink) -> None:
    from urllib.parse import parse_qs, urlsplit

    from edge.sink.fleet import snapshot_jpeg

    query = parse_qs(urlsplit(handler.path).query)
    names = [query.get(key, [""])[0] for key in ("device_id", "source", "label")]
    jpeg = snapshot_jpeg(sink.storage, *names) if all(names) else None
    if jpeg is None:
        handler._send(404, b'{"error":"no such snapshot"}', "application/json")
    else:
        handler._send(200, jpeg, "image/jpeg")


_PAGE_ROUTES: dict[str, Any] = {"/": _page, "/api/fleet": _fleet, "/api/snapshot": _snapshot}


def serve(sink: Sink, addr: str, port: int, page: bool) -> _Server:
    server = _Server((addr, port), _Routes)
    server.sink = sink
    server.page = page
    threading.Thread(target=server.serve_forever, name=f"sink-http :{port}", daemon=True).start()
    return server
