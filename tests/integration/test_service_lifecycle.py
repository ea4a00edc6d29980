"""The services as an operator runs them (processes, configuration from the environment): a broker that refuses
them is explained once in words, and SIGTERM stops them at once even while they wait for it, saying so."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from tests.ports import free_port

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


@pytest.mark.parametrize("service", ["allocator", "binding"])
async def test_a_broker_refusing_the_password_is_explained_once_and_sigterm_ends_the_wait(
    service: str, database_url: str, amqp_url: str
) -> None:
    wrong = str(URL(amqp_url).with_password("not-the-password"))
    env = {
        "HAVIP_DATABASE_URL": database_url,
        "HAVIP_AMQP_URL": wrong,
        "HAVIP_API_TOKEN": "t" * 32,
        "HAVIP_PORT": str(free_port()),
        "HAVIP_METRICS_PORT": "0",
    }
    process = await ServiceProcess.start(f"services.{service}", env)
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
