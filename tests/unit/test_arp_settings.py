"""Watcher configuration: defaults, validation, and the exit code of a bad configuration."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.arp_watcher.settings import WatcherSettings
from shared.settings import EXIT_INVALID_SETTINGS, print_invalid_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("HAVIP_"):
            monkeypatch.delenv(name)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAVIP_INTERFACE", "eth0")
    settings = WatcherSettings()
    assert settings.interface == "eth0"
    assert settings.netns is None
    assert settings.watcher_id == f"{socket.gethostname()}/eth0"
    assert settings.metrics_port == 9102
    assert settings.batch_size >= 1
    assert settings.heartbeat_interval_s == 5.0


def test_everything_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAVIP_INTERFACE", "br-lab")
    monkeypatch.setenv("HAVIP_NETNS", "lab-a")
    monkeypatch.setenv("HAVIP_WATCHER_ID", "watcher-7")
    monkeypatch.setenv("HAVIP_METRICS_PORT", "0")
    monkeypatch.setenv("HAVIP_AMQP_PREFIX", "t1.")
    settings = WatcherSettings()
    assert (settings.interface, settings.netns, settings.watcher_id, settings.metrics_port) == (
        "br-lab",
        "lab-a",
        "watcher-7",
        0,
    )
    assert settings.exchange == "t1.havip.events"


def test_the_default_watcher_id_names_the_host_the_namespace_and_the_interface(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HAVIP_INTERFACE", "eth0")
    assert WatcherSettings().watcher_id == f"{socket.gethostname()}/eth0"
    monkeypatch.setenv("HAVIP_NETNS", "lab-a")
    assert WatcherSettings().watcher_id == f"{socket.gethostname()}/lab-a/eth0"
    monkeypatch.setenv("HAVIP_NETNS", "lab-b")  # another watcher of the host: another id
    assert WatcherSettings().watcher_id == f"{socket.gethostname()}/lab-b/eth0"
    monkeypatch.setenv("HAVIP_WATCHER_ID", "rack-1-left")
    assert WatcherSettings().watcher_id == "rack-1-left"


def test_empty_netns_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAVIP_INTERFACE", "eth0")
    monkeypatch.setenv("HAVIP_NETNS", "")
    assert WatcherSettings().netns is None


def test_netns_may_be_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAVIP_INTERFACE", "eth0")
    monkeypatch.setenv("HAVIP_NETNS", "/proc/1/ns/net")
    assert WatcherSettings().netns == "/proc/1/ns/net"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "HAVIP_INTERFACE"),
        ({"HAVIP_INTERFACE": ""}, "HAVIP_INTERFACE"),
        ({"HAVIP_INTERFACE": "a-very-long-interface-name"}, "HAVIP_INTERFACE"),
        ({"HAVIP_INTERFACE": "eth0/1"}, "HAVIP_INTERFACE"),
        ({"HAVIP_INTERFACE": "eth0", "HAVIP_NETNS": "../etc"}, "HAVIP_NETNS"),
        ({"HAVIP_INTERFACE": "eth0", "HAVIP_METRICS_PORT": "70000"}, "HAVIP_METRICS_PORT"),
        ({"HAVIP_INTERFACE": "eth0", "HAVIP_BATCH_SIZE": "0"}, "HAVIP_BATCH_SIZE"),
        ({"HAVIP_INTERFACE": "eth0", "HAVIP_LOG_LEVEL": "LOUD"}, "HAVIP_LOG_LEVEL"),
        ({"HAVIP_INTERFACE": "eth0", "HAVIP_HEARTBEAT_INTERVAL_S": "0"}, "HAVIP_HEARTBEAT_INTERVAL_S"),
        ({"HAVIP_INTERFACE": "eth0", "HAVIP_HEARTBEAT_INTERVAL_S": "-1"}, "HAVIP_HEARTBEAT_INTERVAL_S"),
    ],
)
def test_invalid_configuration_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], variable: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        WatcherSettings()
    printed = io.StringIO()
    assert print_invalid_settings(WatcherSettings, info.value, printed) == EXIT_INVALID_SETTINGS
    message = printed.getvalue()
    assert message.startswith("invalid configuration:")
    assert variable in message


def test_invalid_configuration_exits_2_without_traceback() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")}
    env["HAVIP_METRICS_PORT"] = "not-a-port"
    result = subprocess.run(
        [sys.executable, "-m", "services.arp_watcher"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "HAVIP_INTERFACE" in result.stderr
    assert "HAVIP_METRICS_PORT" in result.stderr
    assert "Traceback" not in result.stderr
