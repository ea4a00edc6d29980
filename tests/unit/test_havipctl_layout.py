"""havipctl is a client of the public contract, not a part of the services.

It may import the standard library, itself, and the client libraries it is built on (httpx for the API,
aio-pika for the event stream) — nothing of `services`, `shared`, `bench` or `tests`. The services, in turn,
never import havipctl. Checked twice: statically over every import statement of its source (`ast`, so an
import inside a function counts as well), and dynamically by what importing it really loads.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "havipctl"
CLIENT_LIBRARIES = frozenset({"httpx", "aio_pika", "aiormq"})
SERVER_SIDE = ("services", "shared", "bench", "tests")


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import statement of a file; relative imports stay inside it."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            yield node.lineno, node.module


def python_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.py"))


def test_havipctl_imports_only_the_standard_library_itself_and_its_client_libraries() -> None:
    files = python_files(PACKAGE)
    assert len(files) >= 8, files  # the walk really sees the package
    allowed = set(sys.stdlib_module_names) | CLIENT_LIBRARIES | {"havipctl"}
    offending = [
        f"{path.relative_to(ROOT)}:{line}: import {module}"
        for path in files
        for line, module in imported_modules(path)
        if module.partition(".")[0] not in allowed
    ]
    assert offending == [], "havipctl must talk to the public API and event stream only:\n" + "\n".join(offending)


def test_the_import_walk_catches_a_server_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\nfrom . import render\n\ndef f():\n    from services.allocator import app\n"
        "    import shared.events as e\n"
    )
    modules = [module for _, module in imported_modules(bad)]
    assert modules == ["os", "services.allocator", "shared.events"]


def test_no_service_or_shared_module_imports_havipctl() -> None:
    files = [f for top in ("services", "shared") for f in python_files(ROOT / top)]
    assert files
    offending = [
        f"{path.relative_to(ROOT)}:{line}: import {module}"
        for path in files
        for line, module in imported_modules(path)
        if module.partition(".")[0] == "havipctl"
    ]
    assert offending == []


def test_importing_havipctl_loads_no_server_module() -> None:
    code = (
        "import json, sys, havipctl.main, havipctl.watch;"
        f"prefixes = {(*(p + '.' for p in SERVER_SIDE), 'fastapi', 'asyncpg', 'uvicorn', 'pydantic')!r};"
        f"tops = {SERVER_SIDE!r};"
        "print(json.dumps([m for m in sys.modules if m.startswith(prefixes) or m in tops]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert json.loads(out) == []
