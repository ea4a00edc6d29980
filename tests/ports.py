"""A free TCP port on loopback, for the services, servers and proxies the tests and benchmarks start."""

from __future__ import annotations

import socket

# Every port handed out in this process. A port is only free until the process it is meant for binds it, which may
# be seconds later (a service starting up): the kernel may offer the same number again meanwhile, and two of our
# own services would then race for it.
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, never the same one twice in this process."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
