"""`python -m services.allocator [serve]` runs the API; `python -m services.allocator migrate` creates the
database if it is missing, applies the allocator's migrations (as its database role, created if missing) and
declares the allocator's queue of binding events, so that none published before its first start is lost. Bad
configuration: a clear message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
import uvloop
from pydantic import ValidationError

from services.allocator.binding_view.service import QUEUE as VIEW_QUEUE
from services.allocator.binding_view.service import SUBSCRIPTIONS as VIEW_SUBSCRIPTIONS
from services.allocator.database import SCHEMA, SOURCE
from services.allocator.settings import AllocatorSettings
from services.allocator.tls import uvicorn_options
from shared.logging import configure_logging
from shared.messaging import QueueSpec
from shared.runtime import serve
from shared.service_setup import migrate_service
from shared.settings import EXIT_INVALID_SETTINGS, CommonSettings, print_invalid_settings
from shared.tasks import cancel

if TYPE_CHECKING:
    from fastapi import FastAPI

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

log = logging.getLogger("services.allocator")


async def migrate(settings: CommonSettings) -> None:
    await migrate_service(
        settings,
        source=SOURCE,
        schema=SCHEMA,
        migrations=MIGRATIONS,
        queues=[QueueSpec(VIEW_QUEUE, tuple(VIEW_SUBSCRIPTIONS))],
    )


class _Server(uvicorn.Server):
    """uvicorn's server with the process's signals left to shared.runtime: the stop event ends it, and a stop
    during start-up also ends the waits for Postgres and RabbitMQ (uvicorn acts on its own signals only once the
    application has started)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def server_config(settings: AllocatorSettings, app: FastAPI) -> uvicorn.Config:
    """uvicorn's configuration: HTTPS with the certificate and key of the settings (TLS 1.2 at the oldest), plain
    HTTP without them. Forwarded headers (X-Forwarded-For, -Proto) are not trusted: nothing in the API reads the
    client's address or the scheme, and a proxy in front terminates TLS itself (docs/deploy.md)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        proxy_headers=False,
        server_header=False,
        **uvicorn_options(settings.tls_cert_file, settings.tls_key_file),
    )


async def run(settings: AllocatorSettings, stop: asyncio.Event) -> None:
    from services.allocator.app import create_app

    server = _Server(server_config(settings, create_app(settings, stop)))
    scheme = "https" if settings.https else "http"
    log.info("serving %s on %s:%d", scheme.upper(), settings.host, settings.port, extra={"scheme": scheme})

    async def exit_when_stopped() -> None:
        await stop.wait()
        server.should_exit = True

    stopping = asyncio.create_task(exit_when_stopped(), name="stop the server")
    try:
        await server.serve()
    finally:
        await cancel(stopping)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.allocator", description=__doc__)
    parser.add_argument("command", nargs="?", choices=("serve", "migrate"), default="serve")
    args = parser.parse_args(argv)

    settings_type: type[CommonSettings] = CommonSettings if args.command == "migrate" else AllocatorSettings
    try:
        settings = settings_type()
    except ValidationError as exc:
        return print_invalid_settings(settings_type, exc)
    configure_logging("allocator", settings.log_level)

    if args.command == "migrate":
        try:
            asyncio.run(migrate(settings))
        except ValueError as exc:  # e.g. a database name that is not letters, digits and underscores
            print(f"invalid configuration:\n  HAVIP_DATABASE_URL: {exc}", file=sys.stderr)
            return EXIT_INVALID_SETTINGS
        except Exception as exc:
            log.error("migration failed: %s", exc)
            return 1
        return 0

    assert isinstance(settings, AllocatorSettings)
    # The event loop uvicorn would choose: uvloop's.
    return serve(run, settings, loop_factory=uvloop.new_event_loop)


if __name__ == "__main__":
    sys.exit(main())
