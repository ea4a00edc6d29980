"""A client sending to an address continuously, and servers that answer with their name: ``udp_probe.py`` run in
the lab's namespaces, tracked by the lab (stopped by process group), read back as a :class:`TrafficLog`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.lab import udp_probe
from tests.lab.names import check_lab_address
from tests.lab.netns import LabHost
from tests.lab.proc import StartedInContext, terminate_group
from tests.lab.traffic_report import TrafficLog, read_log
from tests.waiting import eventually_sync


class Traffic(StartedInContext):
    """``client`` sends a datagram to ``address``:``port`` every ``interval`` s; each of ``servers`` answers the
    ones that reach it with its name and logs every one addressed to it. Use as a context manager."""

    def __init__(
        self,
        client: LabHost,
        servers: Sequence[LabHost],
        address: str,
        *,
        workdir: Path,
        port: int = 7070,
        interval: float = 0.01,
    ) -> None:
        self.client = client
        self.servers = list(servers)
        self.address = str(check_lab_address(address))
        self.port = port
        self.interval = interval
        self.workdir = Path(workdir) / f"traffic-{self.address}-{port}"
        self._procs: list[tuple[LabHost, subprocess.Popen[bytes]]] = []
        self.died: list[str] = []  # hosts whose probe had ended before stop(): its log is incomplete

    def _log_path(self, host: LabHost) -> Path:
        return self.workdir / f"{host.name}.jsonl"

    def _start(self, host: LabHost, *args: str) -> None:
        path = self._log_path(host)
        with path.open("wb") as out:
            proc = host.popen(sys.executable, udp_probe.__file__, *args, stdout=out, stderr=subprocess.STDOUT)
        self._procs.append((host, proc))

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"udp_probe on {host.name} exited {proc.returncode}: {path.read_text()}")
            return '"ready"' in path.read_text()

        eventually_sync(ready, timeout=20, what=f"udp_probe {args[0]} on {host.name}")

    def start(self) -> None:
        """Servers first (each ready to answer and to count), then the client."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        target = ["--address", self.address, "--port", str(self.port)]
        for server in self.servers:
            self._start(server, "serve", "--name", server.name, *target, "--iface", server.iface)
        self._start(self.client, "send", *target, "--interval", f"{self.interval:g}")

    def stop(self) -> None:
        """End the client first (nothing more in flight), then the servers; note any probe that had ended."""
        for host, proc in reversed(self._procs):
            if proc.poll() is not None and host.name not in self.died:
                self.died.append(host.name)
            terminate_group(proc)

    def log(self) -> TrafficLog:
        """Everything logged so far (also while running)."""
        client = self._log_path(self.client).read_text().splitlines()
        servers = {s.name: self._log_path(s).read_text().splitlines() for s in self.servers}
        return read_log(client, servers)
