"""Published event contracts (docs/contract.md#events): one JSON Schema per event type and an AsyncAPI 3.0
document, generated from the pydantic models in shared/events.py so that what consumers outside this project read
never drifts from what the services publish.

    python -m shared.contracts            # (re)write docs/events/
    python -m shared.contracts --check    # exit 1 and list the files that differ from the models
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model

from shared.events import EVENT_TYPES, SCHEMA_VERSION, Envelope, EventData

REPO_ROOT = Path(__file__).resolve().parent.parent
EVENTS_DIR = Path("docs/events")
SCHEMAS_DIR = EVENTS_DIR / "schemas"
ASYNCAPI_FILE = EVENTS_DIR / "asyncapi.yaml"

EXCHANGE = "havip.events"
DEAD_LETTER_EXCHANGE = "havip.dlx"
DEAD_LETTER_QUEUE = "havip.dead"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
AMQP_BINDING_VERSION = "0.3.0"
PERSISTENT_DELIVERY_MODE = 2

# Which service publishes each routing key (docs/contract.md#events); the AsyncAPI document names it per operation.
_PUBLISHERS: dict[str, str] = {"arp.": "arp_watcher", "havip.binding.": "binding", "havip.claim.": "binding"}
_CONDITION_PREFIXES = ("havip.flapping.", "havip.split_brain.")


# Exceptions to the prefixes: the allocator asks the binding service to publish transitions again.
_PUBLISHED_BY = {"havip.binding.replay_requested": "allocator"}


def publisher_of(event_type: str) -> str:
    if event_type in _PUBLISHED_BY:
        return _PUBLISHED_BY[event_type]
    if event_type.startswith(_CONDITION_PREFIXES):
        return "binding"
    for prefix, service in _PUBLISHERS.items():
        if event_type.startswith(prefix):
            return service
    return "allocator"


def camel_name(event_type: str) -> str:
    """`havip.binding.changed` → `HavipBindingChanged` (AsyncAPI component keys allow no dots)."""
    return "".join(part.capitalize() for part in event_type.replace(".", "_").split("_"))


def schema_path(event_type: str) -> Path:
    return SCHEMAS_DIR / f"{event_type}.json"


def typed_envelope(event_type: str, model: type[EventData]) -> type[BaseModel]:
    """The envelope with `type`, `schema_version` pinned and `data` being the type's own model."""
    fields: dict[str, Any] = {name: (info.annotation, info) for name, info in Envelope.model_fields.items()}
    fields["type"] = (Literal[event_type], Field(description="the routing key; equals the event type"))
    fields["schema_version"] = (
        Literal[SCHEMA_VERSION],
        Field(description="a consumer refuses (dead-letters) versions it does not know"),
    )
    fields["event_id"] = (
        fields["event_id"][0],
        Field(description="unique per event: delivery is at-least-once, so consumers drop ids already seen"),
    )
    fields["data"] = (model, ...)
    return create_model(
        f"{camel_name(event_type)}Event",
        __config__=ConfigDict(extra="forbid", frozen=True),
        __doc__=f"`{event_type}` on the topic exchange `{EXCHANGE}`. {(model.__doc__ or '').strip()}".strip(),
        **fields,
    )


def event_schema(event_type: str) -> dict[str, Any]:
    schema = typed_envelope(event_type, EVENT_TYPES[event_type]).model_json_schema()
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": f"{event_type}.json", **schema}


def exchange_binding() -> dict[str, Any]:
    # A fresh dict per channel: a shared one would come out of PyYAML as anchors and aliases.
    return {
        "is": "routingKey",
        "exchange": {"name": EXCHANGE, "type": "topic", "durable": True, "autoDelete": False, "vhost": "/"},
        "bindingVersion": AMQP_BINDING_VERSION,
    }


def asyncapi_document() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for event_type, model in EVENT_TYPES.items():
        name = camel_name(event_type)
        channels[name] = {
            "address": event_type,
            "title": event_type,
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": {"amqp": exchange_binding()},
        }
        operations[f"publish{name}"] = {
            "action": "send",
            "summary": f"{publisher_of(event_type)} publishes {event_type}",
            "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/{name}"}],
            "bindings": {
                "amqp": {
                    "deliveryMode": PERSISTENT_DELIVERY_MODE,
                    "mandatory": False,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }
        messages[name] = {
            "name": event_type,
            "title": event_type,
            "summary": (model.__doc__ or f"{event_type} event").strip().splitlines()[0],
            "contentType": "application/json",
            "payload": {"$ref": f"schemas/{event_type}.json"},
            "bindings": {
                "amqp": {
                    "contentEncoding": "utf-8",
                    "messageType": event_type,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "HAVIP events",
            "version": str(SCHEMA_VERSION),
            "description": (
                f"Events of the HAVIP control plane, published on the durable topic exchange `{EXCHANGE}` with "
                "the event type as routing key. Every body is the JSON envelope {event_id, type, "
                "schema_version, occurred_at, source, data}. Messages are persistent and published with "
                "publisher confirms; delivery is at-least-once, so consumers drop event ids they have already "
                "seen. A consumer logs in as a broker user of its own (havip-consumer-NAME: it may declare, bind "
                "and read exchanges and queues named consumer-NAME.*, read the event exchange, publish nothing), "
                "binds a durable queue of its own with a dead-letter exchange of its own (e.g. `x-dead-letter-"
                "exchange: consumer-NAME.bindings.dlx`, bound to a queue `consumer-NAME.bindings.dead`) "
                "and acknowledges only after its work is committed; a message it can never process is rejected "
                "without requeue and lands in that dead-letter queue. The services' own dead letters go through "
                f"`{DEAD_LETTER_EXCHANGE}` to `{DEAD_LETTER_QUEUE}`. "
                "Deployments may prefix every exchange and queue name (HAVIP_AMQP_PREFIX). "
                "Generated by `python -m shared.contracts` from shared/events.py: do not edit."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "the deployment's RabbitMQ",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def render() -> dict[Path, str]:
    """Every contract file, by path relative to the repository root, with the text the models generate."""
    files = {
        schema_path(event_type): json.dumps(event_schema(event_type), indent=2, ensure_ascii=False) + "\n"
        for event_type in EVENT_TYPES
    }
    files[ASYNCAPI_FILE] = yaml.safe_dump(
        asyncapi_document(), sort_keys=False, allow_unicode=True, width=115, default_flow_style=False
    )
    return files


def drifted(root: Path) -> list[Path]:
    """Files missing or different from what the models generate, and stale schemas of removed event types."""
    expected = render()
    stale = [
        path.relative_to(root)
        for path in sorted((root / SCHEMAS_DIR).glob("*.json"))
        if path.relative_to(root) not in expected
    ]
    changed = [
        path
        for path, text in expected.items()
        if not (root / path).is_file() or (root / path).read_text(encoding="utf-8") != text
    ]
    return changed + stale


def write(root: Path) -> list[Path]:
    """Write every contract file and remove schemas of event types that no longer exist; return what changed."""
    changes = drifted(root)
    for path, text in render().items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text, encoding="utf-8")
    for path in changes:
        if path.parent == SCHEMAS_DIR and path not in render():
            (root / path).unlink()
    return changes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.contracts", description="Generate the event contracts."
    )
    parser.add_argument("--check", action="store_true", help="list files that differ from the models; exit 1")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    if args.check:
        changes = drifted(args.root)
        for path in changes:
            print(f"differs from shared/events.py: {path}", file=sys.stderr)
        if changes:
            print("regenerate with: python -m shared.contracts", file=sys.stderr)
        return 1 if changes else 0
    for path in write(args.root):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
