"""`python -m services.allocator [serve]` runs the API; `python -m services.allocator migrate` creates the
database if it is missing, applies the allocator's migrations (as its database role, created if missing) and
declares the allocator's queue of binding events, so that none published before its first start is lost. Bad
configuration: a clear message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from services.allocator.binding_view.service import QUEUE as VIEW_QUEUE
from services.allocator.binding_view.service import SUBSCRIPTIONS as VIEW_SUBSCRIPTIONS
from services.allocator.database import SCHEMA, SOURCE
from services.allocator.settings import AllocatorSettings
from shared.logging import configure_logging
from shared.service_setup import migrate_service
from shared.settings import CommonSettings

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
EXIT_CONFIG = 2

log = logging.getLogger("services.allocator")


def _variable(settings_type: type[CommonSettings], field: str) -> str:
    """The environment variable of a field: its alias if it has one (no prefix then), else HAVIP_<NAME>."""
    for name, info in settings_type.model_fields.items():
        if field in (name, info.validation_alias):
            alias = info.validation_alias
            return alias.upper() if isinstance(alias, str) else f"HAVIP_{name.upper()}"
    return f"HAVIP_{field.upper()}"


def describe(settings_type: type[CommonSettings], exc: ValidationError) -> str:
    """One line per problem, naming the variable; never the value (it may be a secret)."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        if error["loc"]:
            lines.append(f"  {_variable(settings_type, str(error['loc'][0]))}: {message}")
        else:
            lines.append(f"  {message}")
    return "invalid configuration:\n" + "\n".join(lines)


async def migrate(settings: CommonSettings) -> None:
    await migrate_service(
        settings,
        source=SOURCE,
        schema=SCHEMA,
        migrations=MIGRATIONS,
        queue=VIEW_QUEUE,
        subscriptions=VIEW_SUBSCRIPTIONS,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.allocator", description=__doc__)
    parser.add_argument("command", nargs="?", choices=("serve", "migrate"), default="serve")
    args = parser.parse_args(argv)

    settings_type: type[CommonSettings] = CommonSettings if args.command == "migrate" else AllocatorSettings
    try:
        settings = settings_type()
    except ValidationError as exc:
        print(describe(settings_type, exc), file=sys.stderr)
        return EXIT_CONFIG
    configure_logging("allocator", settings.log_level)

    if args.command == "migrate":
        try:
            asyncio.run(migrate(settings))
        except ValueError as exc:  # e.g. a database name that is not letters, digits and underscores
            print(f"invalid configuration:\n  HAVIP_DATABASE_URL: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except Exception as exc:
            log.error("migration failed: %s", exc)
            return 1
        return 0

    from services.allocator.app import create_app

    assert isinstance(settings, AllocatorSettings)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        proxy_headers=False,
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
