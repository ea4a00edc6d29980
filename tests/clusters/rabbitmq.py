"""A three-node RabbitMQ cluster on this machine, driven through scripts/rabbitmq-cluster.sh.

`with RabbitCluster(workdir) as cluster:` starts the nodes havip1..3@localhost (or reuses the cluster already
running in `workdir`), and stops them on exit, also when the start or the body failed. Nodes are numbered 1 to 3,
as in `cluster.urls[n - 1]`. The `rabbit_cluster` fixture is one such cluster for the whole test session, in a
temporary directory removed afterwards; only the tests that ask for it start it. The methods block: signalling a
node takes milliseconds, a `rabbitmqctl` call a second or two, a restart several; asynchronous tests call the slow
ones through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from tests import service_logs
from tests.tls import engine_files, make_ca

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rabbitmq-cluster.sh"
NODES = (1, 2, 3)
# The script's own deadlines are 180 s (start, restart) and 60 s (stop, then SIGKILL): these catch a hung script.
WAITING_TIMEOUT_S = 300.0
COMMAND_TIMEOUT_S = 60.0


class ClusterCommandError(RuntimeError):
    """The script exited non-zero; its stderr is in the message."""


@dataclass(frozen=True)
class QueueReplicas:
    """Where a quorum queue's replicas are: node numbers."""

    leader: int | None
    members: tuple[int, ...]
    online: tuple[int, ...]


def node_number(name: str) -> int:
    """`havip2@localhost` → 2."""
    match = re.fullmatch(r"havip([123])@localhost", name)
    if match is None:
        raise ValueError(f"not a node of the cluster: {name!r}")
    return int(match.group(1))


class RabbitCluster:
    """The cluster whose config, data, logs and PID files are in `workdir` (see scripts/rabbitmq-cluster.sh)."""

    def __init__(self, workdir: Path, *, port_base: int | None = None, tls_dir: Path | None = None) -> None:
        """`port_base`: the script's HAVIP_RABBIT_CLUSTER_PORT_BASE (its default, 25700, unless given; kept in
        `workdir` after the first start); `tls_dir`: ca.pem, server.pem and server-key.pem, for a TLS listener on
        each node (HAVIP_RABBIT_CLUSTER_TLS_DIR), whose amqps:// URLs are `tls_urls`."""
        self.workdir = workdir
        self.port_base = port_base
        self.tls_dir = tls_dir
        self.urls: list[str] = []
        self.tls_urls: list[str] = []
        self.started_in_s = 0.0  # from `start` until the three nodes ran in one cluster
        self._frozen: set[int] = set()
        self._cut_off: set[int] = set()  # frozen since their last start: partitioned from the others once thawed

    def __enter__(self) -> Self:
        began = time.monotonic()
        try:
            out = self._run("start", timeout=WAITING_TIMEOUT_S)
        except BaseException:
            with contextlib.suppress(Exception):  # the start's own error is the one to see
                self.stop()
            raise
        self.started_in_s = time.monotonic() - began
        self.urls = [line for line in out.splitlines() if line.startswith("amqp://")]
        self.tls_urls = [line for line in out.splitlines() if line.startswith("amqps://")]
        if len(self.urls) != len(NODES) or len(self.tls_urls) != (len(NODES) if self.tls_dir else 0):
            self.stop()
            raise ClusterCommandError(f"start printed {out.splitlines()!r}, not the URLs of three nodes")
        for n in NODES:
            service_logs.follow(f"rabbitmq node {n}", self.log(n))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Every process the script started in `workdir`, by the PIDs it recorded."""
        for n in NODES:
            service_logs.forget(self.log(n))
        self._frozen.clear()
        self._cut_off.clear()
        self._run("stop", timeout=WAITING_TIMEOUT_S)

    @property
    def ca_file(self) -> Path | None:
        """The CA the nodes' TLS certificate is verified against (None without TLS)."""
        return self.tls_dir / "ca.pem" if self.tls_dir is not None else None

    def log(self, n: int) -> Path:
        return self.workdir / f"node{n}" / "log" / f"havip{n}@localhost.log"

    def pid(self, n: int) -> int | None:
        """Node n's Erlang VM (beam.smp), or None when it does not run."""
        done = self._script("pid", str(n))
        return int(done.stdout) if done.returncode == 0 else None

    def kill(self, n: int) -> None:
        """SIGKILL node n's VM and wait until it is gone (its data stays for `restart`)."""
        self._run("kill", str(n))
        self._frozen.discard(n)
        self._cut_off.discard(n)

    def freeze(self, n: int) -> None:
        """SIGSTOP node n's VM: a hung node, whose sockets stay open."""
        self._run("freeze", str(n))
        self._frozen.add(n)
        self._cut_off.add(n)

    def thaw(self, n: int) -> None:
        """SIGCONT node n's VM. Frozen longer than about 10 s (net_ticktime), it was declared down and stays
        partitioned from the others until `restart(n)`."""
        self._run("thaw", str(n))
        self._frozen.discard(n)

    def restart(self, n: int) -> None:
        """Stop node n if it runs, start it, and wait until it runs in the cluster with the other running nodes."""
        self._run("restart", str(n), timeout=WAITING_TIMEOUT_S)
        self._frozen.discard(n)
        self._cut_off.discard(n)

    def mend(self) -> None:
        """The three nodes running in one cluster again, whatever a test left (also a test that failed half-way
        through a fault): frozen nodes thawed, nodes frozen since their last start restarted, nodes killed or
        stopped started."""
        for n in sorted(self._frozen):
            self.thaw(n)
        for n in sorted(self._cut_off):
            self.restart(n)
        self._run("start", timeout=WAITING_TIMEOUT_S)

    def ctl(self, *args: str, via: int | None = None) -> str:
        """`rabbitmqctl ARGS` against node `via` (by default the first node that runs and is not frozen)."""
        n = via if via is not None else self._answering_node()
        return self._run("ctl", str(n), *args)

    def upgrade(self, n: int, *args: str) -> str:
        """`rabbitmq-upgrade ARGS` against node n: `drain`, `revive`, `await_online_quorum_plus_one`."""
        return self._run("upgrade", str(n), *args, timeout=WAITING_TIMEOUT_S)

    def queues(self, n: int, *args: str) -> str:
        """`rabbitmq-queues ARGS` against node n, e.g. `check_if_node_is_quorum_critical`."""
        return self._run("queues", str(n), *args, timeout=WAITING_TIMEOUT_S)

    def running_nodes(self, via: int | None = None) -> list[int]:
        """The nodes running in the cluster, as `rabbitmqctl cluster_status` on node `via` shows them."""
        status = json.loads(self.ctl("-q", "cluster_status", "--formatter", "json", via=via))
        return sorted(node_number(name) for name in status["running_nodes"])

    def queue_rows(self, *columns: str, vhost: str = "/", via: int | None = None) -> list[dict[str, Any]]:
        """`rabbitmqctl list_queues COLUMNS` in vhost, a dict per queue."""
        rows: list[dict[str, Any]] = json.loads(
            self.ctl("-q", "list_queues", "-p", vhost, *columns, "--formatter", "json", via=via)
        )
        return rows

    def replicas(self, queue: str, vhost: str = "/", via: int | None = None) -> QueueReplicas:
        for row in self.queue_rows("name", "leader", "members", "online", vhost=vhost, via=via):
            if row["name"] == queue:
                return QueueReplicas(
                    leader=node_number(row["leader"]) if row.get("leader") else None,
                    members=tuple(sorted(node_number(m) for m in row.get("members") or [])),
                    online=tuple(sorted(node_number(m) for m in row.get("online") or [])),
                )
        raise LookupError(f"no queue {queue!r} in vhost {vhost!r}")

    def queues_short_of_replicas(self, vhost: str = "/", via: int | None = None) -> list[str]:
        """The quorum queues with a member not online (a restarted node's replicas still starting, say)."""
        return [
            row["name"]
            for row in self.queue_rows("name", "type", "members", "online", vhost=vhost, via=via)
            if row.get("type") == "quorum" and len(row.get("online") or []) < len(row.get("members") or [])
        ]

    def describe(self, vhost: str = "/") -> str:
        """What the broker says of its nodes, quorum queues and consumers, from a node that answers: printed by a
        test whose step stalled, to see where."""
        parts = []
        for args in (
            ("cluster_status",),
            ("list_queues", "-p", vhost, "name", "leader", "members", "online", "consumers", "messages_ready",
             "messages_unacknowledged"),
            ("list_consumers", "-p", vhost, "queue_name", "channel_pid", "active", "activity_status"),
            ("list_connections", "name", "pid", "state"),
        ):  # fmt: skip
            try:
                parts.append(self.ctl("-q", *args))
            except Exception as exc:  # a node that stopped answering meanwhile: say so and go on
                parts.append(f"rabbitmqctl {args[0]}: {exc}")
        return "\n".join(parts)

    def leader_of(self, queue: str, vhost: str = "/") -> int:
        """The node holding the quorum queue's leader (`rabbitmqctl list_queues name leader members`)."""
        leader = self.replicas(queue, vhost).leader
        if leader is None:
            raise LookupError(f"queue {queue!r} has no leader now")
        return leader

    def _answering_node(self) -> int:
        for n in NODES:
            if n not in self._frozen and self.pid(n) is not None:
                return n
        raise ClusterCommandError("no node of the cluster runs")

    def _script(
        self, command: str, *args: str, timeout: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        if self.port_base is not None:
            env["HAVIP_RABBIT_CLUSTER_PORT_BASE"] = str(self.port_base)
        if self.tls_dir is not None:
            env["HAVIP_RABBIT_CLUSTER_TLS_DIR"] = str(self.tls_dir)
        return subprocess.run(
            [str(SCRIPT), command, str(self.workdir), *args],
            capture_output=True, text=True, timeout=timeout, check=False, env=env,
        )  # fmt: skip

    def _run(self, command: str, *args: str, timeout: float = COMMAND_TIMEOUT_S) -> str:
        done = self._script(command, *args, timeout=timeout)
        if done.returncode != 0:
            raise ClusterCommandError(
                f"rabbitmq-cluster.sh {command} {' '.join(args)} exited {done.returncode}: "
                f"{done.stderr.strip()[-2000:]}"
            )
        return done.stdout


@pytest.fixture(scope="session")
def rabbit_cluster_of_the_session() -> Iterator[RabbitCluster]:
    """The three nodes for the whole session, in a temporary directory, stopped and removed at the end. Each node
    listens over TLS too (`tls_urls`, verified against `ca_file`), with a certificate of a throwaway CA."""
    workdir = Path(tempfile.mkdtemp(prefix="havip-rabbit-cluster-"))
    try:
        tls_dir = engine_files(make_ca(workdir / "ca"), workdir / "engine-tls")
        with RabbitCluster(workdir, tls_dir=tls_dir) as cluster:
            yield cluster
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def rabbit_cluster(rabbit_cluster_of_the_session: RabbitCluster) -> Iterator[RabbitCluster]:
    """The session's cluster, for one test module. Tests share it: each uses names of its own and deletes what it
    declares; a module that kills, freezes or restarts nodes gets them mended when it ends, passed or failed, so
    that a failure stays its own and is not also the next module's."""
    yield rabbit_cluster_of_the_session
    rabbit_cluster_of_the_session.mend()
