"""tests.ports: the ports handed out to the services a test starts."""

from __future__ import annotations

import socket

from tests.ports import free_port


def test_a_port_is_never_handed_out_twice_even_while_nothing_binds_it() -> None:
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_a_port_handed_out_can_be_bound() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
