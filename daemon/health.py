"""The supervisor's HTTP endpoints on localhost: /healthz, /readyz, /metrics, /stats.

Handlers only read a snapshot the supervisor builds, so a slow scraper cannot stall
supervision; the server runs on its own thread, and a connection that sends nothing for
IDLE_TIMEOUT_S is closed, so idle or half-open clients cannot pile up threads.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

IDLE_TIMEOUT_S = 10.0


class HealthServer:
    """Serves what `provider(path)` returns as (status, content type, body)."""

    def __init__(self, listen: str, provider: Callable[[str], tuple[int, str, bytes]],
                 idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        host, _, port = listen.rpartition(":")
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = idle_timeout_s  # per connection: socket timeout while waiting for a request

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                try:
                    status, content_type, body = outer.provider(self.path.split("?")[0])
                except Exception as err:  # noqa: BLE001 (a failing page must not take the server down)
                    status, content_type, body = json_body(500, {"error": f"{type(err).__name__}: {err}"})
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                """Scrapes every few seconds would flood the journal."""

        self.provider = provider
        self.server = ThreadingHTTPServer((host, int(port)), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def url(self) -> str:
        """http://host:port of the bound server (the port is real even when 0 was asked for)."""
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HealthServer":
        """Serve in the background."""
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()


def json_body(status: int, value: Any) -> tuple[int, str, bytes]:
    """A JSON response."""
    return status, "application/json", json.dumps(value, indent=1).encode()
