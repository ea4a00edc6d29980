"""What the benchmarks share: a sandbox (temporary database + RabbitMQ vhost, from tests/sandbox.py), the
allocator as a real process in its own process group, percentiles, CPU accounting from /proc, the machine.

A benchmark never touches anything it did not create: its database is `havip_bench_<label>_<hex>` and its
virtual host `havip-bench-<label>-<hex>`, both dropped on exit, also on failure, Ctrl-C or SIGTERM. Only a
SIGKILL of the benchmark leaves them behind (the allocator still goes: it gets SIGTERM when its parent dies);
drop them by name with `psql -c 'DROP DATABASE "havip_bench_…" WITH (FORCE)'` and
`rabbitmqctl delete_vhost havip-bench-…`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from shared.db import drop_database
from shared.messaging import broker_tls_context
from shared.settings import CommonSettings
from tests.clusters.postgres import PostgresHA
from tests.clusters.rabbitmq import RabbitCluster
from tests.ports import free_port
from tests.sandbox import temporary_database, temporary_vhost
from tests.tls import engine_files, make_ca
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
PG_BASE = os.environ.get("HAVIP_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
AMQP_BASE = os.environ.get("HAVIP_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


def say(text: str) -> None:
    """Progress goes to stderr; stdout carries only the result (text or --json)."""
    print(text, file=sys.stderr, flush=True)


# ---- sandbox ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sandbox:
    database_url: str
    amqp_url: str
    amqp_ca_file: Path | None = None  # the brokers' CA, when amqp_url is amqps:// (the database URL says its own)

    @property
    def settings(self) -> dict[str, str]:
        """What the services need beside the two URLs (System's `settings`)."""
        return {"HAVIP_AMQP_CA_FILE": str(self.amqp_ca_file)} if self.amqp_ca_file is not None else {}

    def common_settings(self, **values: Any) -> CommonSettings:
        """The benchmark's own clients' settings (a Broker's), over TLS as the services'."""
        return CommonSettings(amqp_url=self.amqp_url, amqp_ca_file=self.amqp_ca_file, **values)

    def tls_context(self) -> ssl.SSLContext | None:
        """For the benchmark's own aio-pika connections to an amqps:// node: verified as the services verify it."""
        return broker_tls_context(self.common_settings())


@asynccontextmanager
async def sandbox(label: str) -> AsyncIterator[Sandbox]:
    """A temporary database (both services' migrations applied) and a temporary vhost; dropped on exit."""
    run = uuid.uuid4().hex[:10]
    async with temporary_database(PG_BASE, f"havip_bench_{label.replace('-', '_')}_{run}") as dsn:
        with temporary_vhost(AMQP_BASE, f"havip-bench-{label}-{run}") as amqp_url:
            yield Sandbox(dsn, amqp_url)


@asynccontextmanager
async def clustered_sandbox(label: str, *, tls: bool = False) -> AsyncIterator[Sandbox]:
    """The engines clustered, for this run only: a three-node RabbitMQ cluster (scripts/rabbitmq-cluster.sh; its
    default vhost, quorum queues) and a Postgres primary with a synchronous standby under pg_auto_failover
    (scripts/postgres-ha.sh), on port blocks of their own (HAVIP_BENCH_RABBIT_PORT_BASE, default 27700;
    HAVIP_BENCH_PG_PORT_BASE, default 27800); the services' `migrate` creates the database. With `tls` every link
    is encrypted and verified: amqps:// to the nodes' TLS listeners, Postgres with sslmode=verify-full, against a
    throwaway CA made for the run. Everything is stopped and removed on exit."""
    rabbit_base = os.environ.get("HAVIP_BENCH_RABBIT_PORT_BASE", "27700")
    pg_base = int(os.environ.get("HAVIP_BENCH_PG_PORT_BASE", "27800"))
    workdir = Path(tempfile.mkdtemp(prefix=f"havip-bench-{label}-engines-"))
    os.chmod(workdir, 0o755)  # Postgres runs as user postgres, under it
    previous = os.environ.get("HAVIP_RABBIT_CLUSTER_PORT_BASE")
    os.environ["HAVIP_RABBIT_CLUSTER_PORT_BASE"] = rabbit_base
    try:
        tls_dir = engine_files(make_ca(workdir / "ca"), workdir / "engine-tls") if tls else None
        with (
            RabbitCluster(workdir / "rabbit", tls_dir=tls_dir) as rabbit,
            PostgresHA(
                workdir / "pg",
                ports={"monitor": pg_base + 1, "node1": pg_base + 11, "node2": pg_base + 12},
                tls_dir=tls_dir,
            ) as postgres,
        ):
            say(f"engines clustered: RabbitMQ in {rabbit.started_in_s:.1f} s, Postgres in {postgres.bring_up_s} s")
            dsn = postgres.dsn(f"havip_bench_{label.replace('-', '_')}_{uuid.uuid4().hex[:10]}")
            try:
                if tls:
                    yield Sandbox(dsn, ",".join(rabbit.tls_urls), rabbit.ca_file)
                else:
                    yield Sandbox(dsn, ",".join(rabbit.urls))
            finally:
                with contextlib.suppress(Exception):
                    await drop_database(dsn)
    finally:
        if previous is None:
            os.environ.pop("HAVIP_RABBIT_CLUSTER_PORT_BASE", None)
        else:
            os.environ["HAVIP_RABBIT_CLUSTER_PORT_BASE"] = previous
        shutil.rmtree(workdir, ignore_errors=True)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--clustered and --tls, as every benchmark that can run on the clustered engines takes them."""
    parser.add_argument(
        "--clustered",
        action="store_true",
        help="on a three-node RabbitMQ cluster and a Postgres primary with a synchronous standby of the run's own",
    )
    parser.add_argument(
        "--tls", action="store_true", help="with --clustered: every link over TLS (amqps://, sslmode=verify-full)"
    )


def check_engine_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.tls and not args.clustered:
        parser.error("--tls goes with --clustered")


def engines(clustered: bool, tls: bool = False) -> str:
    """How the run's engines were set up, for its result."""
    if clustered:
        how = "RabbitMQ 3-node cluster (quorum queues), Postgres primary + synchronous standby (pg_auto_failover)"
        return how + (", TLS on every link (amqps://, sslmode=verify-full)" if tls else "")
    return "one RabbitMQ node (classic queues but the binding's), one Postgres"


def first_node(amqp_url: str) -> str:
    """One broker node's URL, for the benchmark's own connections (a cluster's nodes are comma-separated)."""
    return amqp_url.split(",", 1)[0]


def raise_open_files_limit(needed: int) -> None:
    """Many sockets at once: lift the soft limit (inherited by the allocator) up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# ---- the HTTP client side ----------------------------------------------------------------------------------


def skip_sniffio_probe() -> None:
    """httpcore tries `import sniffio` several times per request; it is not installed here, so every try
    scans sys.path (measured ≈ 0.1 ms each, ≈ 0.4 ms of client CPU per request). A None entry in
    sys.modules makes the import fail at once; httpcore then assumes asyncio, as it does anyway."""
    if "sniffio" not in sys.modules:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


@asynccontextmanager
async def client_fleet(
    base_url: str, token: str, *, clients: int, concurrency: int, timeout_s: float
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """`clients` httpx.AsyncClients whose pools together hold `concurrency` connections.

    Many small pools rather than one large one: httpcore's pool re-scans every connection for every waiting
    request each time a request starts or ends (O(connections × waiting)). With one client of 1,000
    connections the benchmark measured itself, not the allocator: ≈ 10 ms of client CPU per request,
    83 allocations/s and GET /healthz at 158/s, against ≈ 570/s and ≈ 1,900/s with 1,000 clients of one
    connection each (`--clients 1` reproduces it). One client per connection is also what 1,000 concurrent
    callers look like.
    """
    per_client = max(1, math.ceil(concurrency / clients))
    limits = httpx.Limits(
        max_connections=per_client, max_keepalive_connections=per_client, keepalive_expiry=timeout_s
    )
    tls = ssl.create_default_context()  # unused on http://, but built once rather than once per client
    fleet = [
        httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            limits=limits,
            timeout=timeout_s,
            verify=tls,
        )
        for _ in range(clients)
    ]
    try:
        yield fleet
    finally:
        for client in fleet:
            await client.aclose()


# ---- the allocator as a process -----------------------------------------------------------------------------


async def _exited(process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    try:
        await asyncio.to_thread(process.wait, timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the benchmark dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class AllocatorProcess:
    """`python -m services.allocator` on a free port, logging only warnings, stopped by its process group."""

    database_url: str
    amqp_url: str
    quota_per_vpc: int
    workdir: Path
    profile_to: Path | None = None
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "allocator.log"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the allocator was not started")
        return self.process.pid

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")}
        env.update(
            HAVIP_DATABASE_URL=self.database_url,
            HAVIP_AMQP_URL=self.amqp_url,
            HAVIP_API_TOKEN=self.token,
            HAVIP_HOST="127.0.0.1",
            HAVIP_PORT=str(self.port),
            HAVIP_QUOTA_PER_VPC=str(self.quota_per_vpc),
            HAVIP_LOG_LEVEL="WARNING",
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
        )
        return env

    def spawn(self) -> None:
        command = [sys.executable]
        if self.profile_to is not None:
            command += ["-m", "cProfile", "-o", str(self.profile_to)]
        command += ["-m", "services.allocator"]
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped by group, never by name
            preexec_fn=die_with_parent,
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def wait_ready(self, timeout_s: float) -> None:
        async with httpx.AsyncClient(timeout=1.0) as client:

            async def ready() -> bool:
                if self.process is None or self.process.poll() is not None:
                    code = None if self.process is None else self.process.returncode
                    raise RuntimeError(f"the allocator exited with {code}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    return (await client.get(f"{self.url}/readyz")).status_code == 200
                return False

            try:
                await eventually(ready, timeout=timeout_s, interval=0.05, what="the allocator ready")
            except TimeoutError as exc:
                raise TimeoutError(f"the allocator not ready within {timeout_s} s:\n{self.log_tail()}") from exc

    async def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (SIGINT when profiling) to the process group, SIGKILL after the grace period; idempotent."""
        process = self.process
        if process is not None and process.poll() is None:
            # uvicorn re-raises the signal it stopped on; SIGTERM then kills the process before cProfile can
            # write its file, while SIGINT becomes KeyboardInterrupt, after which cProfile still writes it.
            stop = signal.SIGTERM if self.profile_to is None else signal.SIGINT
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, stop)
            if not await _exited(process, grace_s):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await _exited(process, grace_s)
        if self._log is not None:
            self._log.close()
            self._log = None


# ---- figures ------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    return {
        "p50": percentile(seconds, 50) * 1000,
        "p95": percentile(seconds, 95) * 1000,
        "p99": percentile(seconds, 99) * 1000,
        "max": max(seconds, default=math.nan) * 1000,
    }


# ---- CPU accounting from /proc ------------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15 of stat)


def all_processes_cpu_s() -> dict[int, tuple[str, float]]:
    """pid → (command name, CPU seconds) of every process on the machine."""
    found: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat.rsplit(")", 1)[1].split()
                found[int(entry.name)] = (comm, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return found


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, summed over all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    total = sum(values[:8])  # without guest time, already counted in user
    return (total - idle) / CLK_TCK, total / CLK_TCK


async def wait_for_quiet(
    *,
    below: float,
    window_s: float = 0.5,
    timeout_s: float,
) -> float:
    """Wait (at most timeout_s) for a window in which the machine is less than `below` busy (0..1) with the
    benchmark idle; returns the last window's busy share, so that a noisy run can be told apart."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy0, total0 = machine_cpu_s()
        await asyncio.sleep(window_s)
        busy1, total1 = machine_cpu_s()
        share = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        if share < below or time.monotonic() > deadline:
            return share


@dataclass(frozen=True)
class CpuSnapshot:
    allocator_pid: int
    allocator_s: float
    backends_s: dict[int, float]
    client_s: float
    machine_busy_s: float
    machine_total_s: float
    processes: dict[int, tuple[str, float]]
    at: float

    @classmethod
    def take(cls, allocator_pid: int, backend_pids: Sequence[int]) -> CpuSnapshot:
        busy, total = machine_cpu_s()
        return cls(
            allocator_pid=allocator_pid,
            allocator_s=process_cpu_s(allocator_pid),
            backends_s={pid: process_cpu_s(pid) for pid in backend_pids},
            client_s=own_cpu_s(),
            machine_busy_s=busy,
            machine_total_s=total,
            processes=all_processes_cpu_s(),
            at=time.perf_counter(),
        )

    def until(self, later: CpuSnapshot) -> dict[str, Any]:
        """CPU seconds spent between two snapshots, by whom; `other` is the rest of the machine."""
        allocator = later.allocator_s - self.allocator_s
        backends = sum(later.backends_s.get(pid, v) - v for pid, v in self.backends_s.items())
        client = later.client_s - self.client_s
        busy = later.machine_busy_s - self.machine_busy_s
        known = {os.getpid(), self.allocator_pid, *self.backends_s}
        others: dict[str, float] = {}
        for pid, (comm, cpu) in later.processes.items():
            if pid not in known:
                others[comm] = others.get(comm, 0.0) + cpu - self.processes.get(pid, (comm, 0.0))[1]
        top = sorted(others.items(), key=lambda item: -item[1])[:4]
        return {
            "wall_s": later.at - self.at,
            "allocator_s": allocator,
            "postgres_backends_s": backends,
            "benchmark_client_s": client,
            "other_s": max(busy - allocator - backends - client, 0.0),
            "machine_busy_s": busy,
            "machine_total_s": later.machine_total_s - self.machine_total_s,
            "other_top": {comm: round(cpu, 2) for comm, cpu in top if cpu > 0},
        }


# ---- the machine --------------------------------------------------------------------------------------------


def machine() -> dict[str, str | int]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "host": platform.node(),
        "cores": os.cpu_count() or 0,
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
