"""Structured logging: one JSON object per line on stderr.

A JSON line carries no terminal escape sequences: libraries colour their own text (uvicorn adds a
`color_message` extra to its records), and a value logged from a request may hold anything. Escapes would reach
whoever reads the logs raw (`jq -r`, a log viewer) as colours or cursor moves.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
# Extras that only repeat the message for a terminal: uvicorn's colourised copy of it.
_TERMINAL_ONLY = frozenset({"color_message"})
# ECMA-48 escape sequences: CSI (colours, cursor), OSC (titles, hyperlinks) up to BEL or ST, and the two-byte
# ones; 8-bit CSI too. A lone ESC left over is dropped as well.
_ESCAPE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[@-Z\\-_]"
    r"|\x9b[0-?]*[ -/]*[@-~]"
    r"|\x1b"
)


def strip_escapes(value: Any) -> Any:
    """The value with every terminal escape sequence removed from its strings (lists and dicts included)."""
    if isinstance(value, str):
        return _ESCAPE.sub("", value)
    if isinstance(value, list | tuple):
        return [strip_escapes(v) for v in value]
    if isinstance(value, dict):
        return {strip_escapes(k): strip_escapes(v) for k, v in value.items()}
    return value


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # Fields passed with `extra=` become keys of their own.
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and k not in _TERMINAL_ONLY})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(strip_escapes(entry), default=lambda v: strip_escapes(str(v)))


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiormq logs every reconnect attempt at length; the robust connection's own warnings suffice.
    logging.getLogger("aiormq").setLevel(max(logging.WARNING, root.level))
