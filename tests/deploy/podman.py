"""podman for the compose test: the CLI with the test's own settings, its Docker-compatible API on a private
socket (for docker-compose 1.29), and the health checks podman does not run by itself without systemd."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from types import TracebackType

import httpx

from tests.waiting import eventually_sync

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
CONTAINERS_CONF = HERE / "containers.conf"


class PodmanError(RuntimeError):
    pass


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`podman ARGS` with the test's containers.conf; raises PodmanError (with stderr) when it fails."""
    result = subprocess.run(
        ["podman", *args],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check and result.returncode != 0:
        raise PodmanError(f"podman {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


class PodmanService:
    """`podman system service` on a socket of its own, stopped (by its process group) on exit."""

    def __init__(self, socket_path: Path, log_path: Path) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket_path}"

    def __enter__(self) -> PodmanService:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                ["podman", "system", "service", "--time=0", self.docker_host],
                env=podman_env(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole, nothing else touched
            )
        try:
            self._wait_ready(timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        with httpx.Client(transport=transport, base_url="http://podman", timeout=5.0) as client:

            def answering() -> bool:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise PodmanError(f"podman system service exited: {self.log_path.read_text()[-2000:]}")
                try:
                    return client.get("/_ping").status_code == 200
                except httpx.HTTPError:
                    return False

            try:
                eventually_sync(answering, timeout=timeout, interval=0.1, what="podman system service answering")
            except TimeoutError as exc:
                raise PodmanError(f"podman system service not answering on {self.socket_path}") from exc

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.socket_path.unlink(missing_ok=True)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class HealthChecks(threading.Thread):
    """Runs `podman healthcheck run` for the project's containers that are not (yet) healthy, once a second,
    until stopped: without systemd nothing else runs them, and `depends_on: service_healthy` would wait
    forever. A container whose check passes becomes healthy and is left alone; failures count against its
    `retries` only after its `start_period`, as podman decides."""

    def __init__(self, project: str, interval: float = 1.0) -> None:
        super().__init__(name=f"healthchecks-{project}", daemon=True)
        self.project = project
        self.interval = interval
        self.runs = 0
        self._stop_event = threading.Event()

    def not_healthy(self) -> list[str]:
        result = podman(
            "ps",
            "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", "health=starting",
            "--filter", "health=unhealthy",  # or'ed: an unhealthy one is checked on, as Docker would
            "--format", "{{.Names}}",
            timeout=60, check=False,
        )  # fmt: skip
        return result.stdout.split()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                checks = [
                    subprocess.Popen(
                        ["podman", "healthcheck", "run", name],
                        env=podman_env(),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for name in self.not_healthy()
                ]
                for check in checks:  # in parallel: RabbitMQ's check alone takes over a second
                    try:
                        check.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        check.kill()
                        check.wait()
                self.runs += len(checks)
            except Exception:
                log.exception("health checks of %s failed; trying again", self.project)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=90)
