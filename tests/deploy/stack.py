"""docker-compose.yml brought up for real: docker-compose 1.29 (Debian) against podman's Docker-compatible API,
under a project name of its own, on ports of its own, with the images of tests/deploy/images.py.

Everything the project creates carries its name (containers, volumes, network) and is removed on exit, also when
the start failed; nothing else on the machine is touched.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import yaml

from tests import service_logs
from tests.deploy.images import Images
from tests.deploy.podman import HealthChecks, PodmanService, podman
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
HA_COMPOSE_FILE = ROOT / "docker-compose.ha.yml"  # the ha profile's wiring (docs/deploy.md)
# The services that keep running (migrate is one-shot; grafana is off: its profile is not enabled).
LONG_RUNNING = (
    "postgres",
    "rabbitmq",
    "allocator",
    "allocator-2",
    "api",
    "binding",
    "binding-2",
    "arp_watcher",
    "prometheus",
)
# With the ha profile: a RabbitMQ cluster and a pg_auto_failover pair in place of rabbitmq and postgres.
RABBITMQ_NODES = ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3")
POSTGRES_NODES = ("pg-1", "pg-2")
LONG_RUNNING_HA = (
    *(service for service in LONG_RUNNING if service not in ("postgres", "rabbitmq")),
    *RABBITMQ_NODES,
    "pg-monitor",
    *POSTGRES_NODES,
)
BINDINGS = ("binding", "binding-2")  # the binding service's replicas, each its own HAVIP_REPLICA_ID
UP_TIMEOUT_S = 600.0  # generous: two shared cores, and RabbitMQ's first start


def host_address() -> str:
    """An address of this host that containers reach through their network's gateway (for host.docker.internal:
    podman 4.3 does not know `host-gateway`)."""
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True, check=True
    ).stdout
    addresses = [info["local"] for link in json.loads(out or "[]") for info in link.get("addr_info", [])]
    if not addresses:
        raise RuntimeError("this host has no global IPv4 address for host.docker.internal")
    return str(addresses[0])


@dataclass
class ComposeStack:
    images: Images
    interface: str  # where the watcher captures (a lab capture port in the root namespace)
    workdir: Path
    project: str = field(default_factory=lambda: f"havipci{secrets.token_hex(4)}")
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    api_port: int = field(default_factory=free_port)
    amqp_port: int = field(default_factory=free_port)
    postgres_port: int = field(default_factory=free_port)
    prometheus_port: int = field(default_factory=free_port)
    watcher_metrics_port: int = field(default_factory=free_port)
    # Not the default (8): the value the file passes on reaches every replica and the watcher.
    partitions: int = 6
    # The ha profile (docker-compose.ha.yml too): the broker nodes' other two published ports.
    ha: bool = False
    amqp_port_2: int = field(default_factory=free_port)
    amqp_port_3: int = field(default_factory=free_port)
    up_seconds: float = 0.0
    down_seconds: float = 0.0
    _service: PodmanService | None = None
    _health: HealthChecks | None = None
    _left: list[str] | None = None  # set once closed

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.api_url}/v1", headers={"Authorization": f"Bearer {self.token}"}, timeout=10.0
        )

    # ---- configuration -----------------------------------------------------------------------------------

    def _prometheus_config(self) -> Path:
        """deploy/prometheus/prometheus.yml with the watcher's port of this run (host.docker.internal kept) and a
        1 s scrape interval, so that the test waits less."""
        source = "prometheus-ha.yml" if self.ha else "prometheus.yml"
        config: dict[str, Any] = yaml.safe_load((ROOT / "deploy/prometheus" / source).read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        for job in config["scrape_configs"]:
            if job["job_name"] == "arp_watcher":
                [static] = job["static_configs"]
                [target] = static["targets"]
                host, _ = target.rsplit(":", 1)
                static["targets"] = [f"{host}:{self.watcher_metrics_port}"]
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        path.chmod(0o644)  # read by the container's user nobody
        return path

    def _env_file(self) -> Path:
        values = {
            "HAVIP_POSTGRES_PASSWORD": secrets.token_hex(16),
            "HAVIP_RABBITMQ_PASSWORD": secrets.token_hex(16),
            # The broker users of migrate and of each service (scripts/rabbitmq-users.sh, as the stack runs it).
            "HAVIP_RABBITMQ_MIGRATE_PASSWORD": secrets.token_hex(16),
            "HAVIP_RABBITMQ_ALLOCATOR_PASSWORD": secrets.token_hex(16),
            "HAVIP_RABBITMQ_BINDING_PASSWORD": secrets.token_hex(16),
            "HAVIP_RABBITMQ_WATCHER_PASSWORD": secrets.token_hex(16),
            "HAVIP_API_TOKEN": self.token,
            "HAVIP_GRAFANA_ADMIN_PASSWORD": secrets.token_hex(16),
            "HAVIP_GRAFANA_DATABASE_PASSWORD": secrets.token_hex(16),
            "HAVIP_INTERFACE": self.interface,
            "HAVIP_IMAGE": self.images.havip,
            "HAVIP_PYTHON_IMAGE": self.images.python,
            "HAVIP_POSTGRES_IMAGE": self.images.postgres,
            "HAVIP_RABBITMQ_IMAGE": self.images.rabbitmq,
            "HAVIP_PROMETHEUS_IMAGE": self.images.prometheus,
            "HAVIP_HAPROXY_IMAGE": self.images.haproxy,
            "HAVIP_PUBLISH_ADDRESS": "127.0.0.1",
            "HAVIP_API_PORT": str(self.api_port),
            "HAVIP_AMQP_PORT": str(self.amqp_port),
            "HAVIP_POSTGRES_PORT": str(self.postgres_port),
            "HAVIP_PROMETHEUS_PORT": str(self.prometheus_port),
            "HAVIP_WATCHER_METRICS_PORT": str(self.watcher_metrics_port),
            "HAVIP_WATCHER_ID": f"{self.project}/{self.interface}",
            "HAVIP_PARTITIONS": str(self.partitions),
            "HAVIP_HOST_GATEWAY": host_address(),
            "HAVIP_PROMETHEUS_CONFIG": str(self._prometheus_config()),
        }
        if self.ha:
            values.update(
                HAVIP_RABBITMQ_ERLANG_COOKIE=secrets.token_hex(24),
                HAVIP_AMQP_PORT_2=str(self.amqp_port_2),
                HAVIP_AMQP_PORT_3=str(self.amqp_port_3),
                HAVIP_PG_AUTO_FAILOVER_IMAGE=self.images.pg_auto_failover,
            )
        path = self.workdir / "compose.env"
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()), encoding="utf-8")
        path.chmod(0o600)
        return path

    # ---- running docker-compose --------------------------------------------------------------------------

    def compose(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self._service is not None, "the podman service is not running"
        # Nothing from the caller's environment decides what the stack gets: only the env file does (no
        # COMPOSE_PROFILES but the ha profile's when asked for: Grafana stays off).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HAVIP_", "COMPOSE_", "DOCKER_"))}
        env.update(DOCKER_HOST=self._service.docker_host, COMPOSE_HTTP_TIMEOUT="300")
        argv = ["docker-compose", "--ansi", "never", "-p", self.project, "-f", str(COMPOSE_FILE)]
        if self.ha:
            env["COMPOSE_PROFILES"] = "ha"
            argv += ["-f", str(HA_COMPOSE_FILE)]
        argv += ["--env-file", str(self.workdir / "compose.env"), *args]
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"docker-compose {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}\n"
                f"---- logs ----\n{self.logs()}"
            )
        return result

    def logs(self, tail: int = 40) -> str:
        if self._service is None:
            return "(podman service not running)"
        try:
            return self.compose("logs", "--no-color", f"--tail={tail}", timeout=60, check=False).stdout
        except Exception as exc:  # only ever shown next to a failure: never hide that one
            return f"(logs unavailable: {exc!r})"

    def health(self) -> dict[str, str]:
        """Service -> podman's status of its container ("running (healthy)", "exited (0)", ...)."""
        listed = podman(
            "ps", "-a", "--filter", f"label=com.docker.compose.project={self.project}", "--format", "json"
        ).stdout
        statuses: dict[str, str] = {}
        for container in json.loads(listed or "[]"):
            service = container["Labels"].get("com.docker.compose.service", "?")
            inspect = json.loads(podman("inspect", container["Id"]).stdout)[0]["State"]
            health = (inspect.get("Health") or inspect.get("Healthcheck") or {}).get("Status", "")
            statuses[service] = f"{inspect['Status']} ({health or inspect['ExitCode']})"
        return statuses

    def inspect(self, service: str) -> dict[str, Any]:
        [container] = podman(
            "ps", "-a", "-q",
            "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).stdout.split()  # fmt: skip
        inspected: dict[str, Any] = json.loads(podman("inspect", container).stdout)[0]
        return inspected

    def exec(self, service: str, *argv: str) -> str:
        return podman("exec", self.inspect(service)["Id"], *argv, timeout=60).stdout

    def kill(self, service: str) -> None:
        """SIGKILL to the service's container (its processes die at once, as with a machine lost)."""
        podman("kill", "--signal", "KILL", self.inspect(service)["Id"])

    def start(self, service: str) -> None:
        """Its container started again, unless its restart policy already did."""
        container = self.inspect(service)
        if not container["State"]["Running"]:
            podman("start", container["Id"], check=False)

    # ---- lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> ComposeStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._env_file()
        self._service = PodmanService(self.workdir / "podman.sock", self.workdir / "podman-service.log")
        self._service.__enter__()
        service_logs.follow(f"compose {self.project}", self.logs)
        try:
            self._health = HealthChecks(self.project)
            self._health.start()
            started = time.monotonic()
            self.compose("up", "-d", "--no-build", "--no-color", timeout=UP_TIMEOUT_S)
            self.up_seconds = time.monotonic() - started
        except BaseException:
            self.close()
            raise
        return self

    def leftovers(self) -> list[str]:
        """What of this project still exists in podman (after `down`: nothing)."""
        label = f"label=com.docker.compose.project={self.project}"
        listings = {
            "container": ("ps", "-a", "-q", "--filter", label),
            "volume": ("volume", "ls", "-q", "--filter", label),
            "network": ("network", "ls", "-q", "--filter", label),
        }
        found = []
        for kind, args in listings.items():
            found += [f"{kind} {name}" for name in podman(*args, check=False).stdout.split()]
        return found

    def close(self) -> list[str]:
        """`down -v -t 2`, then remove by label whatever of the project is left; returns what had been left.
        Idempotent."""
        if self._left is not None:
            return self._left
        started = time.monotonic()
        left: list[str] = []
        try:
            if self._health is not None:
                self._health.stop()
            if self._service is not None:
                try:
                    self.compose("down", "-v", "-t", "2", "--remove-orphans", timeout=300)
                finally:
                    left = self.leftovers()
                    for kind, name in (item.split(" ", 1) for item in left):
                        if kind == "container":
                            podman("rm", "-f", "-t", "2", name, check=False)
                        else:
                            podman(kind, "rm", "-f", name, check=False)
        finally:
            service_logs.forget(self.logs)
            if self._service is not None:
                self._service.stop()
                self._service = None
        self.down_seconds = time.monotonic() - started
        self._left = left
        return left

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
