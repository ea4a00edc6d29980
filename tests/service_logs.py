"""The logs of the processes a test started, so that a failing test shows their tails.

Whoever starts a process registers its log here: a file, or a function returning what was collected in
memory. The suite's report hook (tests/conftest.py) appends the last lines of every registered log to the
report of a test that failed. Logs registered as `per_test` (a keepalived started inside one test) are
forgotten after that test; the others stay until `forget`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

LogSource = Path | Callable[[], str]

_LOGS: dict[object, tuple[str, LogSource, bool]] = {}


def follow(name: str, source: LogSource, *, per_test: bool = False) -> None:
    _LOGS[source] = (name, source, per_test)


def forget(source: LogSource) -> None:
    _LOGS.pop(source, None)


def end_of_test() -> None:
    for key in [k for k, (_, _, per_test) in _LOGS.items() if per_test]:
        del _LOGS[key]


def _read(source: LogSource) -> str:
    if callable(source):
        return source()
    try:
        return source.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(unreadable: {exc})"


def tails(lines: int = 40) -> str:
    parts = []
    for name, source, _ in _LOGS.values():
        tail = "\n".join(_read(source).splitlines()[-lines:]) or "(empty)"
        where = f" of {source}" if isinstance(source, Path) else ""
        parts.append(f"---- {name}: last {lines} lines{where} ----\n{tail}")
    return "\n".join(parts)
