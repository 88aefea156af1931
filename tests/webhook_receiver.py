"""A real HTTP receiver for webhook tests: a threaded http.server on a loopback port,
answering from a script (statuses in turn, then a default), recording every request."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HANG = -1  # a scripted answer: hold the request open and never answer (until stop)


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class Receiver:
    script: list[int] = field(default_factory=list)  # answers in turn, then `default`
    default: int = 200
    location: str = ""  # a 3xx answer's Location
    port: int = 0  # 0: any free one
    delay_s: float = 0.0  # before each answer
    requests: list[Received] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)  # the status of each request

    def start(self) -> Receiver:
        receiver = self
        self._release = threading.Event()
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    receiver.requests.append(Received(
                        self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.script.pop(0) if receiver.script else receiver.default
                    receiver.answered.append(status)
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                if status == HANG:
                    receiver._release.wait(120)
                    return
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return self.origin + "/hook"

    def release(self) -> None:
        """End the hanging requests (closed without an answer)."""
        self._release.set()

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def successes(self) -> list[Received]:
        with self._lock:
            return [r for r, s in zip(self.requests, self.answered, strict=True)
                    if 200 <= s < 300]
