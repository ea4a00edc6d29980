"""The three services as real processes, as an operator would run them (used by the e2e tests and the demo)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from tests import service_logs
from tests.lab.proc import StartedInContext
from tests.metrics_text import value
from tests.ports import free_port
from tests.waiting import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("binding", "arp_watcher", "allocator")


@dataclass(frozen=True)
class Spawn:
    """How a service was started: its module, arguments and its own environment (on top of the system's)."""

    module: str
    args: tuple[str, ...]
    env: dict[str, str]


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def log(self, tail: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-tail:])

    @property
    def running(self) -> bool:
        return self.process.poll() is None


@dataclass
class System(StartedInContext):
    """allocator + arp_watcher + binding, wired to one database and one RabbitMQ virtual host; more binding
    replicas, watchers and allocators can be started beside them (`start_binding`, `start_watcher`,
    `start_allocator`), each under a name of its own, and any of them signalled and started again by that name."""

    database_url: str
    amqp_url: str
    interface: str
    workdir: Path
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    netns: str | None = None
    segment: str | None = None  # the watcher's HAVIP_SEGMENT (default: the default segment)
    watcher_id: str | None = None  # the watcher's HAVIP_WATCHER_ID (default: <hostname>/<interface>)
    binding_replica_id: str | None = None  # the binding's HAVIP_REPLICA_ID (default: the host name)
    # A service's own way to RabbitMQ or Postgres (e.g. through a proxy a test can cut); default the above.
    watcher_amqp_url: str | None = None
    binding_amqp_url: str | None = None
    binding_database_url: str | None = None
    # HAVIP_ settings given to every service and to the migrations (e.g. HAVIP_PARTITIONS, HAVIP_LEASE_TIMEOUT_S).
    settings: dict[str, str] = field(default_factory=dict)
    api_port: int = field(default_factory=free_port)
    binding_metrics_port: int = field(default_factory=free_port)
    watcher_metrics_port: int = field(default_factory=free_port)
    services: dict[str, Service] = field(default_factory=dict)
    spawns: dict[str, Spawn] = field(default_factory=dict)  # how each service was first started, by name
    watcher_ports: dict[str, int] = field(default_factory=dict)  # every watcher's metrics port, by service name
    watcher_env: dict[str, str] = field(default_factory=dict)  # more settings for every watcher (e.g. its ring)
    binding_ports: dict[str, int] = field(default_factory=dict)  # every binding replica's metrics port
    allocator_ports: dict[str, int] = field(default_factory=dict)  # every allocator's API port

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")}
        env.update(
            HAVIP_DATABASE_URL=self.database_url,
            HAVIP_AMQP_URL=self.amqp_url,
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.settings)
        env.update(extra)
        return env

    def _spawn(self, name: str, module: str, *args: str, **env: str) -> Service:
        self.spawns[name] = Spawn(module, args, dict(env))
        log_path = self.workdir / f"{name}.log"
        log_file = log_path.open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=self._env(**env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped by group, never by name
        )
        service = Service(name, process, log_path, log_file)
        service_logs.follow(name, log_path)
        self.services[name] = service
        return service

    def migrate(self) -> None:
        service_logs.follow("migrate", self.workdir / "migrate.log")
        with (self.workdir / "migrate.log").open("ab") as log:
            for module in ("services.allocator", "services.binding"):
                subprocess.run(
                    [sys.executable, "-m", module, "migrate"],
                    cwd=ROOT,
                    env=self._env(),
                    check=True,
                    timeout=120,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.migrate()
        for name in SERVICES:
            self.start_service(name)
        self.wait_ready()

    def start_service(self, name: str) -> Service:
        """Start one service (again, after `kill` or `terminate`) exactly as it was first started: the same
        module, configuration and ports. The system's own three start with their defaults the first time."""
        if self.services.get(name) is not None and self.services[name].running:
            raise RuntimeError(f"{name} is running")
        spawn = self.spawns.get(name)
        if spawn is not None:
            return self._spawn(name, spawn.module, *spawn.args, **spawn.env)
        if name == "binding":
            return self.start_binding("binding", self.binding_metrics_port, replica_id=self.binding_replica_id)
        if name == "arp_watcher":
            return self.start_watcher(
                "arp_watcher", self.interface, self.watcher_metrics_port, watcher_id=self.watcher_id
            )
        if name == "allocator":
            return self.start_allocator("allocator", self.api_port)
        raise ValueError(f"no service {name!r}")

    def start_binding(self, name: str, metrics_port: int, *, replica_id: str | None = None) -> Service:
        """A binding replica called `name` (the system's own is `binding`), with its own metrics port and
        HAVIP_REPLICA_ID (default: the host name), on the system's database and broker (services/binding
        README: any number of replicas share the partitions)."""
        binding_env = {
            "HAVIP_METRICS_PORT": str(metrics_port),
            "HAVIP_METRICS_HOST": "127.0.0.1",
            "HAVIP_AMQP_URL": self.binding_amqp_url or self.amqp_url,
            "HAVIP_DATABASE_URL": self.binding_database_url or self.database_url,
        }
        if replica_id:
            binding_env["HAVIP_REPLICA_ID"] = replica_id
        self.binding_ports[name] = metrics_port
        return self._spawn(name, "services.binding", **binding_env)

    def start_watcher(
        self, name: str, interface: str, metrics_port: int, *, watcher_id: str | None = None
    ) -> Service:
        """A watcher process called `name` capturing on `interface`: the system's own (`arp_watcher`), or another
        one on the same segment (docs/contract.md#order), with its own id and metrics port."""
        watcher_env = self.watcher_env | {
            "HAVIP_INTERFACE": interface,
            "HAVIP_METRICS_PORT": str(metrics_port),
            "HAVIP_METRICS_HOST": "127.0.0.1",
            "HAVIP_AMQP_URL": self.watcher_amqp_url or self.amqp_url,
        }
        if watcher_id:
            watcher_env["HAVIP_WATCHER_ID"] = watcher_id
        if self.netns:
            watcher_env["HAVIP_NETNS"] = self.netns
        if self.segment:
            watcher_env["HAVIP_SEGMENT"] = self.segment
        self.watcher_ports[name] = metrics_port
        return self._spawn(name, "services.arp_watcher", **watcher_env)

    def start_allocator(self, name: str, port: int) -> Service:
        """An allocator called `name` (the system's own is `allocator`) serving the API on `port`, with the
        system's token (services/allocator README: any number of replicas behind one address)."""
        self.allocator_ports[name] = port
        return self._spawn(
            name,
            "services.allocator",
            HAVIP_API_TOKEN=self.token,
            HAVIP_HOST="127.0.0.1",
            HAVIP_PORT=str(port),
        )

    def signal(self, name: str, sig: signal.Signals) -> None:
        """`sig` to a service's whole process group (while it has one)."""
        service = self.services[name]
        if service.running:
            with contextlib.suppress(ProcessLookupError):  # it ended just now
                os.killpg(service.process.pid, sig)

    def kill(self, name: str) -> None:
        """SIGKILL a service's whole process group, as a crash would (R3, docs/contract.md#reliability)."""
        service = self.services[name]
        self.signal(name, signal.SIGKILL)
        service.process.wait(timeout=10)
        service.log_file.close()

    def terminate(self, name: str, timeout: float = 30.0) -> int:
        """SIGTERM a service's process group, as an orchestrator stops it, and wait until it has exited (it
        finishes what is under way first); returns its exit status. SIGKILL if it outlives `timeout`."""
        service = self.services[name]
        self.signal(name, signal.SIGTERM)
        try:
            service.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(name, signal.SIGKILL)
            service.process.wait(timeout=10)
        service.log_file.close()
        return service.process.returncode

    def freeze(self, name: str) -> None:
        """SIGSTOP: the process stays, with its sockets open, and does nothing (a stalled host, a long pause)."""
        self.signal(name, signal.SIGSTOP)

    def thaw(self, name: str) -> None:
        self.signal(name, signal.SIGCONT)

    def _ready_url(self, name: str) -> str | None:
        if name in self.allocator_ports:
            return f"http://127.0.0.1:{self.allocator_ports[name]}/readyz"
        if name in self.binding_ports:
            return f"http://127.0.0.1:{self.binding_ports[name]}/metrics"
        if name in self.watcher_ports:
            return f"http://127.0.0.1:{self.watcher_ports[name]}/metrics"
        return None

    def wait_ready(self, timeout: float = 60.0, names: tuple[str, ...] | None = None) -> None:
        """Until each named service (default: every one started) answers on its port."""
        wanted = tuple(self.services) if names is None else names
        pending = {name: url for name in wanted if (url := self._ready_url(name)) is not None}

        def all_ready() -> bool:
            for name, url in list(pending.items()):
                service = self.services[name]
                if service.process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {service.process.returncode}:\n{service.log()}")
                try:
                    if httpx.get(url, timeout=1.0).status_code == 200:
                        del pending[name]
                except httpx.HTTPError:
                    pass
            return not pending

        try:
            eventually_sync(all_ready, timeout=timeout, interval=0.05, what="the services ready")
        except TimeoutError as exc:
            raise TimeoutError(f"not ready within {timeout} s: {sorted(pending)}") from exc

    def stop(self) -> None:
        for name in self.services:
            self.signal(name, signal.SIGTERM)
            self.signal(name, signal.SIGCONT)  # a frozen one would never see the SIGTERM
        for service in self.services.values():
            try:
                service.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.signal(service.name, signal.SIGKILL)
                service.process.wait(timeout=10)
            service.log_file.close()
            service_logs.forget(service.log_path)

    # ---- talking to it -----------------------------------------------------------------------------------

    def api(self, allocator: str | None = None) -> httpx.Client:
        """A client of the API: the system's own allocator, or the one started as `allocator`."""
        port = self.api_port if allocator is None else self.allocator_ports[allocator]
        return httpx.Client(
            base_url=f"http://127.0.0.1:{port}/v1", headers={"Authorization": f"Bearer {self.token}"}, timeout=10.0
        )

    def metric(self, name: str, labels: dict[str, str] | None = None, *, service: str = "binding") -> float:
        """Current value of one sample scraped from a service's /metrics (0 when absent); `service` is "binding"
        (the system's own), "watcher" (idem), or the name of a binding replica, watcher or allocator started
        with `start_binding`, `start_watcher` or `start_allocator`."""
        if service == "binding":
            port = self.binding_metrics_port
        elif service in self.binding_ports:
            port = self.binding_ports[service]
        elif service in self.allocator_ports:
            port = self.allocator_ports[service]
        else:
            port = self.watcher_ports.get(service, self.watcher_metrics_port)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).text
        return value(text, name, labels) or 0.0


def ok(response: httpx.Response) -> Any:
    """The JSON body of a successful API answer (anything else fails the test, showing the answer)."""
    assert response.status_code in (200, 201), f"{response.status_code}: {response.text}"
    return response.json()


def register_inventory(system: System, name: str, cidr: str, hosts: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """A VPC and one subnet of `cidr` with `hosts` (name -> (ip, mac)) as instances, through the API."""
    with system.api() as api:
        vpc = ok(api.post("/vpcs", json={"name": name, "cidr": cidr}))
        subnet = ok(api.post("/subnets", json={"vpc_id": vpc["id"], "name": "lab", "cidr": cidr}))
        instances = {
            host: ok(
                api.post(
                    "/instances",
                    json={"subnet_id": subnet["id"], "name": host, "private_ip": ip, "mac": mac},
                )
            )
            for host, (ip, mac) in hosts.items()
        }
    return {"vpc": vpc, "subnet": subnet, "instances": instances}
