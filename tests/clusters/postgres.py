"""A Postgres primary with a synchronous standby under pg_auto_failover on this machine, for tests and benchmarks.

`PostgresHA(workdir)` drives scripts/postgres-ha.sh (which needs root): a monitor and two data nodes, node1 and
node2, each on its own loopback port, with everything they write under `workdir`. Used as a context manager it
starts the cluster (waiting until a primary has its synchronous standby) and always stops it on exit, also when
the start or the body failed. The `postgres_ha` fixture is one such cluster for the whole test session, in a
temporary directory removed afterwards; only the tests that ask for it start it.

Clients connect with `dsn(database)`: both nodes in one DSN with target_session_attrs=read-write, so that a
client that reconnects with it after an error reaches whichever node is the primary by then.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import service_logs
from tests.lab.proc import StartedInContext
from tests.tls import engine_files, make_ca

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "postgres-ha.sh"
NODES = ("node1", "node2")
DEFAULT_PORTS = {"monitor": 25801, "node1": 25811, "node2": 25812}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeState:
    """One data node as the monitor sees it."""

    name: str
    port: int
    reported: str  # the state the node last reported (a killed node keeps its last one)
    assigned: str  # the state the monitor wants it in
    health: int  # 1 healthy, 0 unhealthy, -1 unknown (the monitor's health checks)


class PostgresHA(StartedInContext):
    def __init__(
        self,
        workdir: Path | str,
        *,
        ports: dict[str, int] | None = None,
        database: str = "havip",
        timeout: float = 180.0,
        tls_dir: Path | None = None,
    ) -> None:
        """`ports`: monitor, node1 and node2 (25801, 25811, 25812 unless given); `database` is created on the
        first start; `timeout`: the deadline of every wait until healthy, in seconds; `tls_dir`: ca.pem,
        server.pem (for 127.0.0.1) and server-key.pem, to create the cluster with TLS (the script's
        PGHA_TLS_DIR), its DSNs then asking sslmode=verify-full against that CA."""
        self.workdir = Path(workdir).resolve()
        self.tls_dir = tls_dir
        self.ports = {**DEFAULT_PORTS, **(ports or {})}
        self.database = database
        self.timeout = timeout
        self.bring_up_s: float | None = None  # how long the last start took, until healthy

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the cluster (first time) or start what is not running; return once healthy."""
        for name in ("monitor", *NODES):
            service_logs.follow(f"pg_autoctl {name}", self.workdir / "log" / f"{name}.log")
        started = time.monotonic()
        self._script("start", timeout=self.timeout + 60)
        self.bring_up_s = time.monotonic() - started

    def stop(self) -> None:
        """Stop every process the script started for this cluster (the data stays in `workdir`)."""
        if (self.workdir / "cluster.env").exists():
            self._script("stop", timeout=120)
        for name in ("monitor", *NODES):
            service_logs.forget(self.workdir / "log" / f"{name}.log")

    # --- where to connect ---------------------------------------------------------------------------------------

    def dsn(self, database: str | None = None) -> str:
        """Both nodes, the writable one wherever it is: for clients that reconnect on error."""
        hosts = ",".join(f"127.0.0.1:{self.ports[name]}" for name in NODES)
        dsn = f"postgresql://postgres@{hosts}/{database or self.database}?target_session_attrs=read-write"
        return dsn + (f"&{self.tls_query}" if self.tls_query else "")

    def node_dsn(self, name: str, database: str | None = None) -> str:
        """One node, whatever its role (to read what a standby has)."""
        dsn = f"postgresql://postgres@127.0.0.1:{self.ports[name]}/{database or self.database}"
        return dsn + (f"?{self.tls_query}" if self.tls_query else "")

    @property
    def ca_file(self) -> Path | None:
        """The CA the nodes' certificate is verified against, as the script keeps it (None without TLS)."""
        return self.workdir / "tls" / "ca.pem" if self.tls_dir is not None else None

    @property
    def tls_query(self) -> str:
        """`sslmode=verify-full&sslrootcert=…` with TLS, else empty."""
        return f"sslmode=verify-full&sslrootcert={self.ca_file}" if self.ca_file is not None else ""

    def monitor_dsn(self) -> str:
        return f"postgresql://autoctl_node@127.0.0.1:{self.ports['monitor']}/pg_auto_failover"

    # --- what the monitor says ----------------------------------------------------------------------------------

    def state(self) -> list[NodeState]:
        """The data nodes as the monitor sees them now."""
        rows = self._script("nodes", timeout=30).split("\n")
        nodes = []
        for row in filter(None, rows):
            name, port, reported, assigned, health = row.split()
            nodes.append(NodeState(name, int(port), reported, assigned, int(health)))
        return nodes

    def primary(self) -> str | None:
        """The node the monitor has made primary and that reports being it; None in the middle of a change."""
        for node in self.state():
            if node.reported == node.assigned and node.assigned in ("primary", "wait_primary", "single"):
                return node.name
        return None

    def other(self, name: str) -> str:
        """The other data node."""
        return next(n for n in NODES if n != name)

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Until one node is primary and the other secondary, with the synchronous standby in place."""
        seconds = timeout or self.timeout
        self._script("wait", timeout=seconds + 30, env={"PGHA_TIMEOUT": str(int(seconds))})

    # --- faults and planned changes -----------------------------------------------------------------------------

    def kill_node(self, name: str = "primary") -> str:
        """kill -9 a whole node (pg_autoctl with its services, Postgres with its backends), as when its machine
        dies; `name` "primary" means whichever node is primary. Returns the node killed."""
        return self._script("kill", name, timeout=60).strip()

    def restart_node(self, name: str) -> None:
        """`pg_autoctl run` again for a killed or stopped node; it rejoins as a secondary (see `wait_healthy`)."""
        self._script("restart", name, timeout=60)

    def switchover(self) -> str:
        """A planned switchover (pg_autoctl perform switchover), returning once healthy again; returns the new
        primary."""
        return self._script("switchover", timeout=self.timeout + 60).strip()

    # --- the script ---------------------------------------------------------------------------------------------

    def _script(self, command: str, *args: str, timeout: float, env: dict[str, str] | None = None) -> str:
        environment = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "PGHA_MONITOR_PORT": str(self.ports["monitor"]),
            "PGHA_NODE1_PORT": str(self.ports["node1"]),
            "PGHA_NODE2_PORT": str(self.ports["node2"]),
            "PGHA_DBNAME": self.database,
            "PGHA_TIMEOUT": str(int(self.timeout)),
            **({"PGHA_TLS_DIR": str(self.tls_dir)} if self.tls_dir is not None else {}),
            # pg_auto_failover's own monitor timings instead of the script's, to compare (see the script)
            **{k: v for k, v in os.environ.items() if k == "PGHA_MONITOR_TIMINGS"},
            **(env or {}),
        }
        done = subprocess.run(
            [str(SCRIPT), command, str(self.workdir), *args],
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        for line in done.stderr.splitlines():
            log.info("%s", line)
        if done.returncode != 0:
            raise RuntimeError(
                f"postgres-ha.sh {command} {' '.join(args)} exited with {done.returncode}:\n{done.stderr.strip()}"
            )
        return done.stdout


@pytest.fixture(scope="session")
def postgres_ha_of_the_session() -> Iterator[PostgresHA]:
    """A primary with a synchronous standby for the whole session, in a temporary directory (under /tmp, which
    user postgres can reach), stopped and removed at the end."""
    workdir = Path(tempfile.mkdtemp(prefix="havip-pg-ha-"))
    # Another run on this machine (a benchmark) may hold the default ports: HAVIP_PG_HA_PORT_BASE moves them.
    base = os.environ.get("HAVIP_PG_HA_PORT_BASE")
    ports = None if base is None else {"monitor": int(base) + 1, "node1": int(base) + 11, "node2": int(base) + 12}
    try:
        # Over TLS: the nodes' DSNs ask sslmode=verify-full against a throwaway CA (`ca_file`).
        tls_dir = engine_files(make_ca(workdir / "ca"), workdir / "engine-tls")
        with PostgresHA(workdir, ports=ports, tls_dir=tls_dir) as cluster:
            yield cluster
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_ha(postgres_ha_of_the_session: PostgresHA) -> Iterator[PostgresHA]:
    """The session's pair, for one test module; a node the module killed or stopped is started again when it
    ends, passed or failed, and the pair is healthy before the next module (`start` starts only what does not
    run)."""
    yield postgres_ha_of_the_session
    postgres_ha_of_the_session.start()
