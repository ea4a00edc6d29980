"""HAVIP_AMQP_URL as one broker or a cluster's nodes, and the heartbeat, the confirm timeout and the net_ticktime
that go with them."""

from __future__ import annotations

import io

import pytest
from pydantic import ValidationError

from shared.settings import CommonSettings, print_invalid_settings

ONE = "amqp://havip:secret@10.0.0.1:5672/havip"


def test_one_url_is_one_node() -> None:
    settings = CommonSettings(amqp_url=ONE)
    assert settings.amqp_urls == (ONE,)
    assert settings.amqp_vhost == "havip"


def test_a_cluster_is_its_nodes_in_the_order_given() -> None:
    nodes = [ONE, "amqp://havip:secret@10.0.0.2:5672/havip", " amqp://havip:secret@10.0.0.3:5672/havip "]
    settings = CommonSettings(amqp_url=",".join(nodes))
    assert settings.amqp_urls == tuple(f"{node.strip()}?heartbeat=3" for node in nodes)


def test_the_heartbeat_asked_for_goes_to_every_node_unless_a_url_sets_its_own() -> None:
    urls = CommonSettings(
        amqp_url=f"{ONE},amqp://havip:secret@10.0.0.2:5672/havip?heartbeat=3", amqp_heartbeat_s=5
    ).amqp_urls
    assert urls == (f"{ONE}?heartbeat=5", "amqp://havip:secret@10.0.0.2:5672/havip?heartbeat=3")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", "no broker URL given"),
        (f"{ONE},http://10.0.0.2/havip", "broker URL 2 is not amqp://"),
        (
            f"{ONE},amqp://havip:secret@10.0.0.2:5672/other",
            "the broker URLs name different users or virtual hosts",
        ),
        (
            f"{ONE},amqp://guest:secret@10.0.0.2:5672/havip",
            "the broker URLs name different users or virtual hosts",
        ),
    ],
)
def test_a_list_that_cannot_be_one_cluster_is_refused_in_words_not_showing_the_password(
    value: str, words: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        CommonSettings(amqp_url=value)
    out = io.StringIO()
    print_invalid_settings(CommonSettings, raised.value, out)
    assert f"HAVIP_AMQP_URL: {words}" in out.getvalue()
    assert "secret" not in out.getvalue()


def test_a_cluster_asks_a_short_heartbeat_unless_told_otherwise() -> None:
    two = f"{ONE},amqp://havip:secret@10.0.0.2:5672/havip"
    assert CommonSettings(amqp_url=two).amqp_urls[0] == f"{ONE}?heartbeat=3"
    assert CommonSettings(amqp_url=two, amqp_heartbeat_s=30).amqp_urls[0] == f"{ONE}?heartbeat=30"
    assert CommonSettings(amqp_url=ONE).amqp_urls == (ONE,)


def test_a_cluster_waits_shorter_for_a_confirm_unless_told_otherwise() -> None:
    two = f"{ONE},amqp://havip:secret@10.0.0.2:5672/havip"
    assert CommonSettings(amqp_url=ONE).publish_timeout == 5.0
    assert CommonSettings(amqp_url=two).publish_timeout == 2.0
    assert CommonSettings(amqp_url=two, publish_timeout_s=7.5).publish_timeout == 7.5


def test_a_silent_node_is_known_down_after_the_clusters_net_ticktime_and_a_quarter() -> None:
    two = f"{ONE},amqp://havip:secret@10.0.0.2:5672/havip"
    assert CommonSettings(amqp_url=ONE).silent_node_down_s is None  # one node: nobody to move to
    assert CommonSettings(amqp_url=two).silent_node_down_s == 10 * 1.25 + 1.0
    assert CommonSettings(amqp_url=two, amqp_net_ticktime_s=60).silent_node_down_s == 60 * 1.25 + 1.0
    with pytest.raises(ValidationError, match="amqp_net_ticktime_s"):
        CommonSettings(amqp_url=two, amqp_net_ticktime_s=0)
