"""The services as an operator runs them (processes, configuration from the environment): a broker or a database
that refuses them is explained once in words, the service carries on once it answers, and SIGTERM stops them at
once even while they wait for it, saying so; a bad configuration is one clear line per setting."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from tests.ports import free_port
from tests.tcp_proxy import CuttableProxy

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 30.0


class ServiceProcess:
    """A service started with `python -m`, its JSON log lines read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.raw: list[bytes] = []

    @classmethod
    async def start(cls, module: str, env: dict[str, str]) -> ServiceProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, cwd=ROOT, env={**base, **env},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        return cls(proc)

    async def wait_for(self, words: str) -> dict[str, Any]:
        async with asyncio.timeout(DEADLINE_S):
            while True:
                for line in self.lines:
                    if words in line.get("msg", ""):
                        return line
                await self._read_line()

    async def _read_line(self) -> None:
        assert self.proc.stdout is not None
        raw = await self.proc.stdout.readline()
        if not raw:
            raise AssertionError(f"the process ended; it said: {[line.get('msg') for line in self.lines]}")
        self.raw.append(raw)
        self.lines.append(json.loads(raw))  # every line is JSON: nothing printed raw

    async def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE_S):
            assert self.proc.stdout is not None
            while raw := await self.proc.stdout.readline():
                self.raw.append(raw)
                self.lines.append(json.loads(raw))
            return await self.proc.wait()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


def service_env(database_url: str, amqp_url: str) -> dict[str, str]:
    return {
        "HAVIP_DATABASE_URL": database_url,
        "HAVIP_AMQP_URL": amqp_url,
        "HAVIP_API_TOKEN": "t" * 32,
        "HAVIP_PORT": str(free_port()),
        "HAVIP_METRICS_PORT": "0",
    }


READY = {"allocator": "allocator ready", "binding": "binding service running"}


@pytest.mark.parametrize("service", ["allocator", "binding"])
async def test_a_broker_refusing_the_password_is_explained_once_and_sigterm_ends_the_wait(
    service: str, database_url: str, amqp_url: str
) -> None:
    wrong = str(URL(amqp_url).with_password("not-the-password"))
    process = await ServiceProcess.start(f"services.{service}", service_env(database_url, wrong))
    try:
        said = await process.wait_for("refused the login of user 'guest': wrong user name or password")
        assert said["level"] == "WARNING"
        await process.terminate()
    finally:
        process.kill()
    warnings = [line["msg"] for line in process.lines if line["level"] in ("WARNING", "ERROR")]
    assert warnings == [said["msg"]]  # once, in words; no trace, no line per attempt
    messages = [line["msg"] for line in process.lines]
    assert any(m.startswith("SIGTERM received") for m in messages), messages
    assert any("stopped before RabbitMQ answered" in m for m in messages), messages
    # No terminal colours in JSON (uvicorn adds them to its records as `color_message`).
    assert not any(b"\\u001b" in raw or b"\x1b" in raw for raw in process.raw)
    assert not any("color_message" in line for line in process.lines)


@pytest.mark.parametrize("service", ["allocator", "binding"])
async def test_a_database_not_listening_is_explained_once_and_the_service_starts_once_it_answers(
    service: str, database_url: str, amqp_url: str
) -> None:
    proxy = CuttableProxy(upstream_port=5432)  # not listening yet: nothing accepts connections on its port
    through_proxy = database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}", 1)
    process = await ServiceProcess.start(f"services.{service}", service_env(through_proxy, amqp_url))
    try:
        said = await process.wait_for(f"nothing accepts connections at 127.0.0.1:{proxy.port}")
        assert said["level"] == "WARNING"
        assert "(is PostgreSQL running?)" in said["msg"]
        with proxy:
            await process.wait_for(READY[service])
            assert await process.terminate() == 0
    finally:
        process.kill()
    warnings = [line["msg"] for line in process.lines if line["level"] in ("WARNING", "ERROR")]
    assert warnings == [said["msg"]]  # once, in words; no trace, no line per attempt
    messages = [line["msg"] for line in process.lines]
    assert "connected to postgresql" in messages


@pytest.mark.parametrize("service", ["allocator", "binding"])
async def test_sigterm_ends_the_wait_for_a_database_that_does_not_exist(
    service: str, database_url: str, amqp_url: str
) -> None:
    name = f"havip_missing_{uuid.uuid4().hex[:8]}"
    missing = database_url.rsplit("/", 1)[0] + f"/{name}"
    process = await ServiceProcess.start(f"services.{service}", service_env(missing, amqp_url))
    try:
        said = await process.wait_for(f"PostgreSQL at 127.0.0.1:5432 has no database '{name}'")
        assert said["level"] == "WARNING"
        assert await process.terminate() == 0
    finally:
        process.kill()
    warnings = [line["msg"] for line in process.lines if line["level"] in ("WARNING", "ERROR")]
    assert warnings == [said["msg"]]
    messages = [line["msg"] for line in process.lines]
    assert any(m.startswith("SIGTERM received") for m in messages), messages
    assert any("stopped before PostgreSQL answered" in m for m in messages), messages


@pytest.mark.parametrize(
    ("service", "env"),
    [
        ("allocator", {"HAVIP_API_TOKEN": "t" * 32}),
        ("binding", {}),
        ("arp_watcher", {"HAVIP_INTERFACE": "eth0"}),
    ],
)
def test_a_bad_configuration_is_one_clear_line_per_setting_and_exit_status_2(
    service: str, env: dict[str, str]
) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")}
    bad = {"HAVIP_LOG_LEVEL": "LOUD", "HAVIP_PUBLISH_TIMEOUT_S": "soon"}
    result = subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        cwd=ROOT,
        env={**base, **env, **bad},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "invalid configuration:",
        "  HAVIP_LOG_LEVEL: String should match pattern '^(DEBUG|INFO|WARNING|ERROR)$'",
        "  HAVIP_PUBLISH_TIMEOUT_S: Input should be a valid number, unable to parse string as a number",
    ]
