"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lab import Lab


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A keepalived pair (cvm1, cvm2), an intruder and the watcher's capture port `cap` on one bridge, in the
    documentation range; a module that needs another lab defines its own `lab`."""
    with Lab("192.0.2.0/24") as lab:
        lab.add_host("cvm1", "192.0.2.11")
        lab.add_host("cvm2", "192.0.2.12")
        lab.add_host("intruder", "192.0.2.66")
        lab.add_capture_port("cap")
        yield lab
