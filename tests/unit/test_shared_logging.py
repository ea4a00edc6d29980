"""shared.logging: one JSON object per line, and no terminal escape sequence in it."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import click
import pytest

from shared.logging import JsonFormatter, strip_escapes

ESC = "\x1b"


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """A logger of its own writing through the JSON formatter into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("test"))
    logger = logging.getLogger("tests.shared_logging")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def entries(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_uvicorns_colour_copy_of_the_message_is_left_out(lines: io.StringIO) -> None:
    # What uvicorn's server logs at start-up (uvicorn/server.py): the message, and a colourised copy as an extra.
    colour = "Uvicorn running on " + click.style("%s://%s:%d", bold=True) + " (Press CTRL+C to quit)"
    assert ESC in colour
    logging.getLogger("tests.shared_logging").info(
        "Uvicorn running on %s://%s:%d (Press CTRL+C to quit)",
        "http",
        "127.0.0.1",
        8080,
        extra={"color_message": colour},
    )
    (entry,) = entries(lines)
    assert entry["msg"] == "Uvicorn running on http://127.0.0.1:8080 (Press CTRL+C to quit)"
    assert "color_message" not in entry
    assert "\\u001b" not in lines.getvalue()


def test_escapes_are_stripped_from_the_message_extras_and_traceback(lines: io.StringIO) -> None:
    logger = logging.getLogger("tests.shared_logging")
    red = click.style("refused", fg="red")
    try:
        raise ValueError(f"{ESC}]0;title{ESC}\\bad {red}")
    except ValueError:
        logger.exception("claim %s from %s", red, f"{ESC}[2J{ESC}[Hmac", extra={"names": [red, {"k": red}]})
    (entry,) = entries(lines)
    assert entry["msg"] == "claim refused from mac"
    assert entry["names"] == ["refused", {"k": "refused"}]
    assert isinstance(entry["exc"], str)
    assert entry["exc"].endswith("ValueError: bad refused")
    assert "\\u001b" not in lines.getvalue()


def test_an_extra_that_is_not_json_is_its_text_without_escapes(lines: io.StringIO) -> None:
    class Shouting:
        def __str__(self) -> str:
            return click.style("loud", bold=True)

    logging.getLogger("tests.shared_logging").info("x", extra={"thing": Shouting(), "count": 3})
    (entry,) = entries(lines)
    assert (entry["thing"], entry["count"]) == ("loud", 3)


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("\x1b[1;31mred\x1b[0m", "red"),
        ("\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", "link"),  # OSC 8 hyperlink, ST-terminated
        ("\x1b]0;title\x07after", "after"),  # OSC, BEL-terminated
        ("a\x1bMb", "ab"),  # two-byte escape (reverse index)
        ("a\x9b31mb", "ab"),  # 8-bit CSI
        ("lone\x1b", "lone"),
        ("plain text: 10.0.0.0/16 [ok]", "plain text: 10.0.0.0/16 [ok]"),
    ],
)
def test_strip_escapes(text: str, clean: str) -> None:
    assert strip_escapes(text) == clean


def test_the_traceback_is_kept_otherwise() -> None:
    formatter = JsonFormatter("svc")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("n", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    entry = json.loads(formatter.format(record))
    assert entry["msg"] == "failed"
    assert "Traceback (most recent call last)" in entry["exc"]
    assert entry["service"] == "svc"
