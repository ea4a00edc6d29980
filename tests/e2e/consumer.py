"""docs/events/example_consumer.py as a process next to the services (used by the traffic e2e test and the demo):
started in its own process group, its JSON lines collected as they come."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.lab.proc import ProcessRegistry, StartedInContext, terminate_group
from tests.waiting import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONSUMER = ROOT / "docs" / "events" / "example_consumer.py"


def epoch_ns(rfc3339: str) -> int:
    """An RFC 3339 time as ns since the epoch (microsecond precision)."""
    moment = datetime.fromisoformat(rfc3339)
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1_000


class ExampleConsumer(StartedInContext):
    """The example consumer on its own queue of ``amqp_url``'s virtual host, with extra arguments ``args``."""

    def __init__(self, amqp_url: str, queue: str, *args: str, registry: ProcessRegistry | None = None) -> None:
        self.argv = [sys.executable, str(EXAMPLE_CONSUMER), "--queue", queue, *args]
        self.amqp_url = amqp_url
        self.registry = registry
        self._records: list[dict[str, Any]] = []
        self._stderr: list[str] = []
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait until its queue is bound (from then on no event is missed)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")}
        env.update(HAVIP_AMQP_URL=self.amqp_url, PYTHONUNBUFFERED="1")
        process = subprocess.Popen(
            self.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        self._process = process
        if self.registry is not None:
            self.registry.add(process)
        threading.Thread(target=self._read_records, args=(process,), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(process,), daemon=True).start()

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"the example consumer did not get ready (it exited): {self.stderr()}")
            return bool(self.records("ready"))

        try:
            eventually_sync(ready, timeout=timeout, what="the example consumer ready")
        except TimeoutError as exc:
            raise RuntimeError(f"the example consumer did not get ready: {self.stderr()}") from exc

    def _read_records(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            record = json.loads(line)
            with self._lock:
                self._records.append(record)

    def _read_stderr(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            with self._lock:
                self._stderr.append(line.decode(errors="replace"))

    def records(self, outcome: str | None = None, havip_id: str | None = None) -> list[dict[str, Any]]:
        """What it printed so far, optionally only one outcome and one HAVIP's."""
        with self._lock:
            found = list(self._records)
        return [
            r
            for r in found
            if (outcome is None or r["outcome"] == outcome) and (havip_id is None or r.get("havip_id") == havip_id)
        ]

    def stderr(self) -> str:
        with self._lock:
            return "".join(self._stderr[-40:])

    def stop(self) -> None:
        if self._process is not None:
            terminate_group(self._process)
