"""A TCP proxy to RabbitMQ that a test can cut (connections dropped, new ones refused) and restore: a broker
outage for one service only, without touching the RabbitMQ that other tests and runs use.

Threads, not asyncio: it keeps forwarding while a test's event loop is blocked (sync fixtures, subprocess
waits), as a real network would.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

from tests.ports import free_port


class CuttableProxy:
    def __init__(self, upstream_port: int = 5672, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.connections = 0  # accepted since start, for the tests' own checks

    def url(self, amqp_url: str) -> str:
        """`amqp_url` (to 127.0.0.1:upstream) rewritten to go through the proxy."""
        host, port = self.upstream
        return amqp_url.replace(f"{host}:{port}", f"127.0.0.1:{self.port}", 1)

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        """Listen (again, on the same port)."""
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the port again after cut()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="proxy accept").start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut()
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True, name="proxy pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and reset the open ones, as a broker that went away."""
        if self._listener is not None:
            # shutdown wakes the thread blocked in accept(); close alone would leave the port listening.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def __enter__(self) -> CuttableProxy:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cut()
