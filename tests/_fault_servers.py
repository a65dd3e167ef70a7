"""Fault servers the emulator cannot play (star-imported by conftest): a real socket server on 127.0.0.1 that
reads each request whole, then answers 200 with a Content-Length and its cost and trickles the body one byte
every `interval` s (`trickle`), or never answers at all (`silent`). It counts what it got and what it charged,
per content, as the emulator does."""

from __future__ import annotations

import hashlib
import socket
import socketserver
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Literal

import pytest

from normals_pipeline.emulator._server import _image_part

__all__ = ["FaultServer", "fault_server"]

BODY = b"\xff\xd8\xff" + b"\x00" * 997  # starts like a JPEG; never whole at one byte every interval


class FaultServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, mode: Literal["trickle", "silent"], interval: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode, self.interval = mode, interval
        self.requests = 0  # requests read whole
        self.charged_by_content: Counter[str] = Counter()  # 200s whose headers (and cost) went out
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def charged(self) -> int:
        with self._lock:
            return sum(self.charged_by_content.values())

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
        with self._lock:
            for connection in self._open:
                connection.close()

    def note(self, connection: socket.socket, *, opened: bool) -> None:
        with self._lock:
            (self._open.add if opened else self._open.discard)(connection)

    def received(self, digest: str, *, charged: bool) -> None:
        with self._lock:
            self.requests += 1
            if charged:
                self.charged_by_content[digest] += 1


class _Handler(socketserver.StreamRequestHandler):
    server: FaultServer

    def handle(self) -> None:
        self.server.note(self.connection, opened=True)
        try:
            self._answer()
        except OSError:  # the client went away (its deadline, its stop)
            pass
        finally:
            self.server.note(self.connection, opened=False)

    def _answer(self) -> None:
        headers = {}
        self.rfile.readline()  # the request line
        while (line := self.rfile.readline().strip()) and b":" in line:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.rfile.read(int(headers.get("content-length", "0")))
        digest = hashlib.sha256(_image_part(headers["content-type"], body)).hexdigest()
        trickle = self.server.mode == "trickle"
        self.server.received(digest, charged=trickle)
        if not trickle:
            self.server.stopping.wait()
            return
        head = ["HTTP/1.1 200 OK", "Content-Type: image/jpeg", f"Content-Length: {len(BODY)}", "x-credits-consumed: 1"]
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode())
        for byte in BODY:
            if self.server.stopping.wait(self.server.interval):
                return
            self.wfile.write(bytes([byte]))


@pytest.fixture
def fault_server() -> Iterator[Callable[..., FaultServer]]:
    """Start fault servers (`mode`, `interval` s between the body's bytes); stop them at teardown."""
    started: list[FaultServer] = []

    def start(mode: Literal["trickle", "silent"] = "trickle", interval: float = 2.0) -> FaultServer:
        started.append(FaultServer(mode, interval))
        return started[-1]

    yield start
    for server in started:
        server.stop()
